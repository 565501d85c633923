"""Every example in README.md, run as a newcomer would run it.

The quick start's ``python3 -m sluice serve`` starts a real server (on free ports: tests never
take 8001); every grpcurl and ``sluice`` command of the README's ``sh`` blocks and its Python
snippet then run against it, with its address in place of 127.0.0.1:8001. The ``yaml`` model
configs load on a real server. The test command must be what ``.ci/run`` runs, and the
``docker`` commands and the ``kubectl`` commands that need a cluster are the only ones not
run (the README says so); ``kubectl kustomize`` renders are run by ``tests/deploy``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from sluice.machine import default_workers
from sluice.repository import EXAMPLE_REPOSITORY
from sluice_client import Client
from tests.compat.procs import Completed, grpcurl_binary, run
from tests.conftest import REPO_ROOT, StartServer
from tests.deploy.manifests import RENDERED
from tests.serve_process import serve_process

README = REPO_ROOT / "README.md"
DOC_ADDRESS = "127.0.0.1:8001"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```$", re.DOTALL | re.MULTILINE)
SERVE = ["python3", "-m", "sluice", "serve"]
TEST_COMMAND = "python3 -m pip install -e '.[test]' && python3 -m pytest"
#: The install and test commands: installing is what tests/test_packaging.py does, and the
#: test command is this suite (what .ci/run runs).
INSTALL_AND_TEST = ("python3 -m pip install -e .", *TEST_COMMAND.split(" && "))
SERVING = "ready: serving mlp (version 2), passthrough (version 1), simple (version 1), " + (
    "tiny_llama (version 1)"
)


@dataclass(frozen=True)
class Block:
    language: str
    text: str
    section: str


def blocks(language: str) -> list[Block]:
    text = README.read_text()
    found = []
    for match in BLOCK.finditer(text):
        headings = re.findall(r"^#+ (.+)$", text[: match.start()], re.MULTILINE)
        found.append(Block(match.group(1), match.group(2), headings[-1]))
    return [block for block in found if block.language == language]


def commands(block: Block) -> list[list[str]]:
    """The shell commands of a block: a command ends at a newline outside quotes and no
    backslash; ``&&`` chains are split; comments are dropped."""
    found: list[list[str]] = []
    pending = ""
    for line in block.text.splitlines(keepends=True):
        pending += line
        try:
            argv = shlex.split(pending.replace("\\\n", " "), comments=True)
        except ValueError:  # a quote still open: the command goes on on the next line
            continue
        if pending.rstrip("\n").endswith("\\"):
            continue
        pending = ""
        while "&&" in argv:
            found.append(argv[: argv.index("&&")])
            argv = argv[argv.index("&&") + 1 :]
        if argv:
            found.append(argv)
    assert not pending, f"unfinished command in {block.text!r}"
    return found


def client_commands() -> list[list[str]]:
    """Every grpcurl and sluice command of the README, in order."""
    return [
        argv
        for block in blocks("sh")
        for argv in commands(block)
        if argv[0] in ("grpcurl", "sluice")
    ]


DEPLOY_SECTION = "Deploy on Kubernetes / KServe"


def test_every_command_is_run_here_or_said_not_to_be() -> None:
    """A new README command has to be run by this module (or be a docker command)."""
    for block in blocks("sh"):
        for argv in commands(block):
            if argv[0] in ("grpcurl", "sluice") or argv == SERVE:
                continue
            if argv[0] == "docker":
                assert block.section == "Container", block
                continue
            if argv[0] == "kubectl":
                assert block.section == DEPLOY_SECTION, block
                if argv[1] == "kustomize":  # rendered and validated by tests/deploy
                    assert argv[2] in RENDERED, argv
                continue  # apply / create need a cluster: the section says so
            assert shlex.join(argv) in INSTALL_AND_TEST, argv
    assert len(client_commands()) >= 10


def test_the_test_command_is_what_ci_runs() -> None:
    assert any(TEST_COMMAND in block.text for block in blocks("sh"))
    assert (REPO_ROOT / ".ci" / "run").read_text().rstrip().endswith(TEST_COMMAND)


def readme_argv(argv: list[str], address: str) -> list[str]:
    """A README command as run here: the server's address, this interpreter's ``sluice``."""
    argv = [address if arg == DOC_ADDRESS else arg for arg in argv]
    if argv[0] == "grpcurl":
        binary = grpcurl_binary()
        assert binary is not None
        return [binary, *argv[1:]]
    return [sys.executable, "-m", "sluice", *argv[1:]]


@pytest.mark.slow
@pytest.mark.toolchain("grpcurl")
async def test_quick_start_and_every_client_example(tmp_path: Path) -> None:
    (quick_start, *_) = blocks("sh")
    assert SERVE in commands(quick_start)
    (snippet,) = blocks("python")
    async with serve_process(cwd=tmp_path) as server:
        await server.wait_for(re.escape(SERVING))
        address = await server.address()
        if "SLUICE_WORKERS" not in os.environ and not os.environ.get("SLUICE_TEST_WORKERS"):
            # As a newcomer runs it: ``workers`` chosen from the machine, as README says.
            chosen = await server.wait_for(r"workers (\d+), chosen from the machine")
            assert int(chosen.group(1)) == default_workers()
        results: list[Completed] = []
        for argv in client_commands():
            results.append(
                await run(*readme_argv(argv, address), env={"SLUICE_URL": address}, limit_s=120)
            )
        python = await run(sys.executable, "-c", snippet.text.replace(DOC_ADDRESS, address))
        with Client(address) as client:
            greedy = client.generate_text("tiny_llama", "Once upon a time", max_new_tokens=16)
        assert await server.stop() == 0
    failed = [done.describe() for done in results if done.returncode != 0 or not done.stdout]
    assert failed == [], "\n".join(failed)
    assert python.check().stdout == greedy.text


@pytest.mark.parametrize("index", range(len(blocks("yaml"))))
async def test_model_configs_load(
    index: int, start_server: StartServer, example_repository: Path
) -> None:
    """Each config block, as the config of the example ``mlp`` (the models it names exist);
    one that says it is a generation model's, as the example ``tiny_llama``'s."""
    config = blocks("yaml")[index].text
    model, version = (
        ("tiny_llama", "1") if config.startswith("# a generation model's config") else ("mlp", "2")
    )
    for name in re.findall(r"model: (\w+)", config):
        shutil.copytree(EXAMPLE_REPOSITORY / model, example_repository / name)
    (example_repository / model / "config.yaml").write_text(config)
    server = await start_server(repository=example_repository)
    rows = {(row.name, row.version): row for row in server.service.index()}
    assert rows[(model, version)].state == "READY", rows
