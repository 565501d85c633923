"""Every recipe in docs/grpcurl.md, run against a real server.

A recipe is a ```sh block holding one grpcurl command (lines may end in a backslash); the
```json or ```text block right after it lists output lines it must print, in order, where
`...` skips any number of lines (and a line ending in `...` matches by its start). A recipe
whose output shows `ERROR:` must fail; any other must succeed.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

import pytest

from tests.certs import ADMIN_CN, Certificates
from tests.clients.conftest import GENERATION_MODEL, served_generation_model
from tests.compat.procs import grpcurl_binary, run
from tests.conftest import REPO_ROOT, RunningServer, StartServer

DOC = REPO_ROOT / "docs" / "grpcurl.md"
DOC_ADDRESS = "127.0.0.1:8001"
#: The admin token the doc's bearer-header recipe sends.
DOC_ADMIN_TOKEN = "s3cret"
GRPCURL = grpcurl_binary()
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.DOTALL)

pytestmark = [pytest.mark.slow, pytest.mark.toolchain("grpcurl")]


@dataclass(frozen=True)
class Recipe:
    argv: list[str]
    expected: list[str]

    @property
    def fails(self) -> bool:
        return "ERROR:" in self.expected

    @property
    def name(self) -> str:
        return " ".join(a for a in self.argv[1:] if "/" in a or a in ("list", "describe"))


def recipes() -> list[Recipe]:
    blocks = list(BLOCK.finditer(DOC.read_text()))
    found = []
    for block, following in zip(blocks, [*blocks[1:], None], strict=True):
        if block.group(1) != "sh":
            continue
        assert following is not None and following.group(1) in ("json", "text"), block.group(2)
        between = DOC.read_text()[block.end() : following.start()]
        assert not between.strip(), f"output must follow its command: {block.group(2)}"
        argv = shlex.split(block.group(2).replace("\\\n", " "))
        assert argv[0] == "grpcurl" and DOC_ADDRESS in argv, argv
        found.append(Recipe(argv, following.group(2).strip().splitlines()))
    return found


def missing_lines(expected: list[str], actual: list[str]) -> list[str]:
    """Expected lines not found in order in `actual` (`...` skips ahead)."""
    position = 0
    for want in (line.strip() for line in expected):
        if want == "...":
            continue
        prefix = want.removesuffix("...").rstrip() if want.endswith("...") else None
        while position < len(actual) and not (
            actual[position].strip() == want
            or (prefix is not None and actual[position].strip().startswith(prefix))
            or (want.startswith("Message: ") and actual[position].strip().startswith(want))
        ):
            position += 1
        if position == len(actual):
            return [want]
        position += 1
    return []


RECIPES = recipes()


def test_the_doc_has_every_recipe_the_issue_asks_for() -> None:
    names = " ".join(recipe.name for recipe in RECIPES)
    for needed in (
        "list",
        "describe",
        "Health/Check",
        "Health/Watch",
        "ModelMetadata",
        "ModelInfer",
        "GenerationService/Generate",
    ):
        assert needed in names, needed
    flags = {arg for recipe in RECIPES for arg in recipe.argv}
    assert {"-cacert", "-cert", "-key", "-servername", "-H"} <= flags


async def doc_server(
    recipe: Recipe, start_server: StartServer, certificates: Certificates
) -> RunningServer:
    """The server a recipe assumes: plaintext (with the doc's admin token), TLS (`-cacert`
    alone), or mTLS with the doc's admin identity (`-cert`)."""
    if "-cert" in recipe.argv:
        return await start_server(
            tls=certificates.server_settings(), admin={"identities": [ADMIN_CN]}
        )
    if "-cacert" in recipe.argv:
        return await start_server(tls=certificates.server_settings(mutual=False))
    return await start_server(admin={"token": DOC_ADMIN_TOKEN})


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
async def test_recipe(
    recipe: Recipe, start_server: StartServer, certificates: Certificates
) -> None:
    server = await doc_server(recipe, start_server, certificates)
    if GENERATION_MODEL in " ".join(recipe.argv) and not await served_generation_model(
        server.address
    ):
        pytest.skip(f"the server does not serve {GENERATION_MODEL}")
    assert GRPCURL is not None
    argv = [server.address if arg == DOC_ADDRESS else arg for arg in recipe.argv[1:]]
    # The doc's certificate files (ca.pem, client.pem, ...) are in the working directory.
    done = await run(GRPCURL, *argv, cwd=certificates.directory, limit_s=60)
    assert (done.returncode != 0) == recipe.fails, done.describe()
    actual = (done.stdout + done.stderr).splitlines()
    assert missing_lines(recipe.expected, actual) == [], done.describe()


def test_output_lines_must_appear_in_order() -> None:
    actual = ["{", '  "status": "SERVING"', "}", "ERROR:", "  Code: NotFound"]
    assert missing_lines(["{", "...", "}", "ERROR:"], actual) == []
    assert missing_lines(['"status": ...'], actual) == []
    assert missing_lines(["ERROR:", "{"], actual) == ["{"]
    assert missing_lines(['"status": "NOT_SERVING"'], actual) == ['"status": "NOT_SERVING"']
