#!/bin/sh
# `redis-server [flags]` (or only flags) runs the server with protected mode off and the
# flags given after it, which override; anything else is run as it is.
set -eu
if [ "${1#-}" != "$1" ]; then
    set -- redis-server "$@"
fi
if [ "${1:-}" = redis-server ]; then
    shift
    set -- redis-server --protected-mode no --dir /data "$@"
fi
exec "$@"
