# Sourced by the image build before each `pip install`: points pip at the wheelhouse (/wheels) when it
# holds wheels, so the build never touches an index; otherwise at PyPI, and for torch
# (PIP_ENV_FOR=torch) at the index of TORCH_VARIANT. Sets pip's own variables (PIP_NO_INDEX, ...).
if ls /wheels/*.whl >/dev/null 2>&1; then
    export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels
elif [ "${PIP_ENV_FOR:-deps}" = torch ]; then
    case "${TORCH_VARIANT:-cpu}" in
        cpu) export PIP_INDEX_URL=https://download.pytorch.org/whl/cpu ;;
        cuda) ;;  # PyPI's Linux x86_64 torch wheels are CUDA builds
        *) echo "pip-env: TORCH_VARIANT must be cpu or cuda, not '$TORCH_VARIANT'" >&2; exit 2 ;;
    esac
fi
