#!/usr/bin/env bash
# Get a runnable Triton perf_analyzer without touching the system or the Python environment.
#
# The real perf-analyzer wheels (2.58+) are tagged manylinux_2_38: they need glibc >= 2.38
# and GLIBCXX_3.4.32, which Debian 12 (glibc 2.36) lacks. This script
#   1. downloads the wheel for that platform into a private cache (never installed into the
#      active Python environment),
#   2. tries the binary directly; when it does not run (too old glibc), fetches Debian 13
#      (trixie) libc6, libstdc++6 and libgcc-s1 with `apt-get download`, using a private apt
#      configuration/state that points the system's own Debian mirror at the trixie suite
#      (the system's apt configuration is never changed), and unpacks them into a private
#      root with `dpkg-deb -x`,
#   3. writes a wrapper that starts the binary through that root's dynamic loader (or
#      directly, when it runs natively), checks it, and prints its path as the last line of
#      stdout. Everything else goes to stderr.
#
# Idempotent and cached: a second run only re-checks the wrapper.
#
# Environment:
#   SLUICE_CACHE              cache root (default: <repo>/.cache); files go to $SLUICE_CACHE/perf_analyzer
#   PERF_ANALYZER_VERSION     wheel version (default: 2.60.0)
#   SLUICE_DEBIAN_MIRROR      Debian mirror URI to use instead of the one read from /etc/apt
#   SLUICE_DEBIAN_SUITE       suite for the newer libraries (default: trixie)
#   PYTHON                    python used for `pip` (default: python3)
# Options:
#   --refresh                 discard the cached wheel, private root and wrapper first
set -euo pipefail

PA_VERSION="${PERF_ANALYZER_VERSION:-2.60.0}"
SUITE="${SLUICE_DEBIAN_SUITE:-trixie}"
PYTHON="${PYTHON:-python3}"
LIB_PACKAGES=(libc6 libstdc++6 libgcc-s1)
MULTIARCH="x86_64-linux-gnu"

log() { printf '[get_perf_analyzer] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

script_dir="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd -- "$script_dir/.." && pwd)"
cache_root="${SLUICE_CACHE:-$repo_root/.cache}"
mkdir -p "$cache_root"
cache_root="$(cd -- "$cache_root" && pwd)"
dest="$cache_root/perf_analyzer"
wheel_dir="$dest/wheel-$PA_VERSION"
root_dir="$dest/root-$SUITE"
apt_dir="$dest/apt-$SUITE"
wrapper="$dest/perf_analyzer"

refresh=0
for arg in "$@"; do
    case "$arg" in
        --refresh) refresh=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
            exit 0
            ;;
        *) die "unknown argument: $arg" ;;
    esac
done

[[ "$(uname -m)" == "x86_64" ]] || die "only x86_64 Linux is supported (perf-analyzer wheels are x86_64)"
mkdir -p "$dest"

# Serialise concurrent runs (e.g. parallel test sessions) on the same cache.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$dest/.lock"
    flock 9
fi

if [[ $refresh == 1 ]]; then
    log "refresh: removing cached wheel, private root and wrapper"
    rm -rf -- "$wheel_dir" "$root_dir" "$apt_dir" "$wrapper"
fi

# A run is good when `--version` exits 0 and names perf_analyzer. (perf_analyzer has no
# --help/-h: they exit 99; with no arguments it prints its usage and exits 99 too.)
runs_ok() {
    local out
    out="$("$@" --version 2>&1)" || return 1
    grep -q 'Perf Analyzer Version' <<<"$out"
}

# --- 1. the wheel -----------------------------------------------------------------------
pa_bin="$wheel_dir/perf_analyzer/bin/perf_analyzer"
if [[ ! -x "$pa_bin" ]]; then
    log "downloading perf-analyzer==$PA_VERSION (manylinux_2_38_x86_64) into $wheel_dir"
    tmp_wheel="$(mktemp -d "$dest/.wheel.XXXXXX")"
    trap 'rm -rf -- "$tmp_wheel"' EXIT
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --no-compile \
        --only-binary=:all: --platform manylinux_2_38_x86_64 \
        --target "$tmp_wheel" "perf-analyzer==$PA_VERSION" >&2
    [[ -f "$tmp_wheel/perf_analyzer/bin/perf_analyzer" ]] ||
        die "wheel has no perf_analyzer/bin/perf_analyzer (layout changed?)"
    chmod +x "$tmp_wheel/perf_analyzer/bin/perf_analyzer"
    chmod 0755 "$tmp_wheel"   # mktemp -d makes it 0700
    rm -rf -- "$wheel_dir"
    mv -- "$tmp_wheel" "$wheel_dir"
    trap - EXIT
fi

# Directories inside the wheel that hold shared libraries (2.60.0 ships none; the binary
# only needs libz, libssl3 and libcrypto3 from the system besides libc/libstdc++/libgcc).
wheel_lib_dirs="$(find "$wheel_dir" -name '*.so*' -type f -printf '%h\n' 2>/dev/null | sort -u | paste -sd: -)"

# --- 2. the Debian mirror, read from the system's apt sources --------------------------
# Prints the URI of the first enabled `deb` source whose suites include $1 (or, with $2=any,
# any suite that is not a security suite). Reads one-line and deb822 formats.
find_mirror() {
    local want="$1" mode="${2:-exact}" f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r "$f" ]] || continue
        awk -v want="$want" -v mode="$mode" '
            /^[[:space:]]*deb[[:space:]]/ {
                sub(/^[[:space:]]*deb[[:space:]]+/, "")
                if ($0 ~ /^\[/) sub(/^\[[^]]*\][[:space:]]*/, "")
                uri = $1; suite = $2
                if (uri ~ /security/ || suite ~ /-security$/) next
                if (suite == want || mode == "any") { print uri; exit }
            }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r "$f" ]] || continue
        awk -v want="$want" -v mode="$mode" '
            function reset() { is_deb = 0; enabled = 1; uris = ""; suites = "" }
            function flush(   n, i, s, u) {
                if (is_deb && enabled && uris != "") {
                    split(uris, u, /[[:space:]]+/)
                    n = split(suites, s, /[[:space:]]+/)
                    for (i = 1; i <= n; i++) {
                        if (s[i] == "" || s[i] ~ /-security$/ || u[1] ~ /security/) continue
                        if (s[i] == want || mode == "any") { print u[1]; done = 1; exit }
                    }
                }
                reset()
            }
            BEGIN { reset() }
            /^#/ { next }
            /^[[:space:]]*$/ { flush(); next }
            /^[[:space:]]/ { next }   # continuation line (e.g. an inline Signed-By key)
            {
                key = tolower($1); sub(/:$/, "", key)
                val = $0; sub(/^[^:]*:[[:space:]]*/, "", val); sub(/[[:space:]]+$/, "", val)
                if (key == "types") is_deb = (" " val " " ~ /[[:space:]]deb[[:space:]]/)
                else if (key == "uris") uris = val
                else if (key == "suites") suites = val
                else if (key == "enabled") enabled = (tolower(val) !~ /^(no|false|0)$/)
            }
            END { if (!done) flush() }' "$f"
    done
}

system_mirror() {
    local codename="" m
    if [[ -r /etc/os-release ]]; then
        codename="$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")"
    fi
    if [[ -n "$codename" ]]; then
        m="$(find_mirror "$codename" | head -n1)"
        [[ -n "$m" ]] && { printf '%s\n' "${m%/}"; return; }
    fi
    m="$(find_mirror "" any | head -n1)"
    [[ -n "$m" ]] && printf '%s\n' "${m%/}"
}

# --- 3. the private root with newer libc/libstdc++/libgcc --------------------------------
build_private_root() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: cannot fetch $SUITE libraries"
    command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb not found: cannot unpack $SUITE libraries"
    local mirror keyring
    mirror="${SLUICE_DEBIAN_MIRROR:-$(system_mirror)}"
    [[ -n "$mirror" ]] || die "no Debian mirror found in /etc/apt/sources.list{,.d}; set SLUICE_DEBIAN_MIRROR"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    log "fetching ${LIB_PACKAGES[*]} from $mirror ($SUITE) with a private apt state in $apt_dir"

    rm -rf -- "$apt_dir"
    mkdir -p "$apt_dir/etc/sources.list.d" "$apt_dir/etc/preferences.d" \
        "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/debs"
    : >"$apt_dir/state/status"
    if [[ -r "$keyring" ]]; then
        printf 'deb [signed-by=%s] %s %s main\n' "$keyring" "$mirror" "$SUITE" >"$apt_dir/etc/sources.list"
    else
        printf 'deb %s %s main\n' "$mirror" "$SUITE" >"$apt_dir/etc/sources.list"
    fi

    local -a apt_opts=(
        -o "Dir::Etc::sourcelist=$apt_dir/etc/sources.list"
        -o "Dir::Etc::sourceparts=-"
        -o "Dir::Etc::preferences=$apt_dir/etc/preferences"
        -o "Dir::Etc::preferencesparts=$apt_dir/etc/preferences.d"
        -o "Dir::State=$apt_dir/state"
        -o "Dir::State::lists=$apt_dir/state/lists"
        -o "Dir::State::status=$apt_dir/state/status"
        -o "Dir::Cache=$apt_dir/cache"
        -o "Dir::Cache::archives=$apt_dir/cache/archives"
        -o "Dir::Cache::pkgcache="
        -o "Dir::Cache::srcpkgcache="
        -o "Debug::NoLocking=true"
        -o "Acquire::Languages=none"
        -o "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false"
        -o "APT::Get::List-Cleanup=false"
        -o "APT::Default-Release="
    )
    # Root-run apt downloads as user _apt, who may not be able to write into a private
    # cache under a home or work directory: download as the current user instead.
    if [[ "$(id -u)" == 0 ]]; then
        apt_opts+=(-o "APT::Sandbox::User=root")
    fi

    apt-get "${apt_opts[@]}" -q update >&2 || die "apt-get update for $SUITE failed"
    (cd "$apt_dir/debs" && apt-get "${apt_opts[@]}" -q download "${LIB_PACKAGES[@]}" >&2) ||
        die "apt-get download ${LIB_PACKAGES[*]} failed"

    local tmp_root deb
    tmp_root="$(mktemp -d "$dest/.root.XXXXXX")"
    for deb in "$apt_dir"/debs/*.deb; do
        [[ -e "$deb" ]] || die "no .deb files were downloaded"
        log "unpacking $(basename -- "$deb")"
        dpkg-deb -x "$deb" "$tmp_root"
    done
    # Debian 13 ships its libraries under /usr/lib (merged /usr); cope with an older layout.
    if [[ ! -e "$tmp_root/usr/lib/$MULTIARCH/ld-linux-x86-64.so.2" && -e "$tmp_root/lib/$MULTIARCH/ld-linux-x86-64.so.2" ]]; then
        mkdir -p "$tmp_root/usr/lib/$MULTIARCH"
        cp -a "$tmp_root/lib/$MULTIARCH/." "$tmp_root/usr/lib/$MULTIARCH/"
    fi
    [[ -e "$tmp_root/usr/lib/$MULTIARCH/ld-linux-x86-64.so.2" ]] ||
        die "unpacked $SUITE packages have no usr/lib/$MULTIARCH/ld-linux-x86-64.so.2"
    (cd "$apt_dir/debs" && ls -1 -- *.deb) >"$tmp_root/.packages"
    chmod 0755 "$tmp_root"   # mktemp -d makes it 0700
    rm -rf -- "$root_dir"
    mv -- "$tmp_root" "$root_dir"
    rm -rf -- "$apt_dir/state/lists" "$apt_dir/cache"   # keep only the .debs and config
}

# --- 4. the wrapper -------------------------------------------------------------------
write_wrapper() {
    local mode="$1" tmp
    tmp="$(mktemp "$dest/.wrapper.XXXXXX")"
    {
        printf '#!/usr/bin/env bash\n'
        printf '# Generated by scripts/get_perf_analyzer.sh (perf-analyzer %s, %s).\n' "$PA_VERSION" "$mode"
        if [[ "$mode" == native ]]; then
            if [[ -n "$wheel_lib_dirs" ]]; then
                printf 'export LD_LIBRARY_PATH=%q"${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"\n' "$wheel_lib_dirs"
            fi
            printf 'exec %q "$@"\n' "$pa_bin"
        else
            local libdir="$root_dir/usr/lib/$MULTIARCH"
            local libpath="$libdir${wheel_lib_dirs:+:$wheel_lib_dirs}"
            # --library-path replaces LD_LIBRARY_PATH; the system's default directories
            # (libz, libssl3, libcrypto3) are still searched after it.
            printf 'exec %q --library-path %q %q "$@"\n' \
                "$libdir/ld-linux-x86-64.so.2" "$libpath" "$pa_bin"
        fi
    } >"$tmp"
    chmod 0755 "$tmp"
    mv -f -- "$tmp" "$wrapper"
}

if [[ -x "$wrapper" ]] && grep -qF -- "$pa_bin" "$wrapper" && runs_ok "$wrapper"; then
    log "cached wrapper works"
elif runs_ok "$pa_bin"; then
    log "perf_analyzer runs natively"
    write_wrapper native
else
    log "perf_analyzer does not run natively: $("$pa_bin" --version 2>&1 | head -n1 || true)"
    if [[ ! -e "$root_dir/usr/lib/$MULTIARCH/ld-linux-x86-64.so.2" ]]; then
        build_private_root
    fi
    write_wrapper "private $SUITE loader"
    runs_ok "$wrapper" || die "wrapper $wrapper does not run: $("$wrapper" --version 2>&1 | tail -n3 || true)"
    log "perf_analyzer runs through the $SUITE loader in $root_dir"
fi

printf '%s\n' "$wrapper"
