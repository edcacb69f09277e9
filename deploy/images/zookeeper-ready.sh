#!/bin/bash
# Exit 0 when the server on localhost:2181 answers `ruok` with `imok` (the compose healthcheck).
exec 3<>/dev/tcp/127.0.0.1/2181 || exit 1
printf ruok >&3
read -r -t 2 answer <&3 || true
[ "${answer:-}" = imok ]
