"""``python -m model_store``: train, build the default model, list and show models."""

from model_store.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
