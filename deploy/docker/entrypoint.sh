#!/bin/sh
# Container entrypoint: make sure the store has the default model, then exec the server (so it is PID 1
# and receives SIGTERM directly: it stops taking requests, finishes in-flight ones and exits).
#   EXITSERVE_ENSURE_DEFAULT=0 skips the first-start training (the server then fails fast if the model
#   is missing). Arguments are passed to `python -m server`.
set -eu
store=${EXITSERVE_STORE:-/store}
model=${EXITSERVE_MODEL:-spam-minilm}

has_model() {
    for manifest in "$store/$model"/*/manifest.json; do
        [ -f "$manifest" ] && return 0
    done
    return 1
}

if [ "${EXITSERVE_ENSURE_DEFAULT:-1}" = 1 ] && [ "$model" = spam-minilm ] && ! has_model; then
    echo "exitserve: no model '$model' in $store; training the default model (~15 min on a CPU)." >&2
    echo "exitserve: mount a store that has it at $store to skip this." >&2
    python -m model_store ensure-default --store "$store"
fi
exec python -m server "$@"
