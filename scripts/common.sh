# Shared by scripts/test, scripts/demo and bench/run: build and install the
# extension, and run the rest as an unprivileged user (PostgreSQL refuses root).

PG_BINDIR=$(pg_config --bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin)
export PATH="$PG_BINDIR:$PATH"

# build_and_install: compile and install into the server's directories
# Servers that are running map saga.so: the old file is renamed away, never
# rewritten in place, so they keep their copy.
build_and_install() {
    local sudo= lib
    [[ $(id -u) -eq 0 ]] || sudo=sudo
    make -s -C "$ROOT" >/dev/null
    lib="$(pg_config --pkglibdir)/saga.so"
    if [[ -e $lib ]]; then
        $sudo mv -f "$lib" "$lib.replaced"
    fi
    if ! $sudo make -s -C "$ROOT" install >/dev/null; then
        [[ ! -e $lib.replaced ]] || $sudo mv -f "$lib.replaced" "$lib"
        return 1
    fi
    $sudo rm -f "$lib.replaced"
}

# as_user DIR CMD...: run CMD in DIR as the unprivileged user; when run as
# root, DIR is a copy of the tree owned by that user.
RUN_USER=${SAGA_TEST_USER:-postgres}
workdir_for() {
    if [[ $(id -u) -ne 0 ]]; then
        echo "$ROOT"
        return
    fi
    local dir
    dir=$(mktemp -d /tmp/saga-run.XXXXXX)
    cp -a "$ROOT/." "$dir/"
    chown -R "$RUN_USER" "$dir"
    echo "$dir"
}
as_user() {
    local dir=$1
    shift
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u "$RUN_USER" -- env PATH="$PATH" bash -c 'cd "$0" && exec "$@"' "$dir" "$@"
    else
        (cd "$dir" && "$@")
    fi
}
