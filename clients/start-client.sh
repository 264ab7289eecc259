#!/usr/bin/env sh
# Start this device's fedmaml SuperNode with the settings of an env file (default: ./client.env).
#
#   cp client.env.example client.env   # then edit it
#   ./start-client.sh client.env
#
# It runs `fedmaml client` in the foreground (Ctrl-C or SIGTERM stops the SuperNode cleanly),
# so it also serves as the command of a service manager (see fedmaml-client.service).
set -eu

ENV_FILE="${1:-client.env}"
if [ ! -f "$ENV_FILE" ]; then
    echo "start-client.sh: no settings file $ENV_FILE (copy client.env.example and edit it)" >&2
    exit 2
fi
# shellcheck disable=SC1090
. "$ENV_FILE"

: "${SUPERLINK:?set SUPERLINK=host:port in $ENV_FILE}"
: "${DATA:?set DATA=/path/to/your/data in $ENV_FILE}"

set -- --superlink "$SUPERLINK" --data "$DATA" \
    --role "${ROLE:-train}" --client-index "${CLIENT_INDEX:-0}" --device "${DEVICE:-auto}"
[ -n "${FORMAT:-}" ] && set -- "$@" --format "$FORMAT"
[ -n "${LABEL_COLUMN:-}" ] && set -- "$@" --label-column "$LABEL_COLUMN"
[ -n "${FEATURE_COLUMNS:-}" ] && set -- "$@" --feature-columns "$FEATURE_COLUMNS"
[ -n "${LEAF_USER:-}" ] && set -- "$@" --user "$LEAF_USER"
[ -n "${PORT:-}" ] && set -- "$@" --port "$PORT"
if [ "${INSECURE:-0}" = 1 ]; then
    set -- "$@" --insecure
elif [ -n "${ROOT_CERTIFICATES:-}" ]; then
    set -- "$@" --root-certificates "$ROOT_CERTIFICATES"
fi
[ -n "${AUTH_KEY:-}" ] && set -- "$@" --auth-key "$AUTH_KEY"
[ "${PRINT_COMMAND:-0}" = 1 ] && set -- "$@" --print-command

exec "${FEDMAML:-fedmaml}" client "$@"
