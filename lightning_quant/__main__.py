"""``python -m lightning_quant recipe=<name> [overrides]``: the same as the ``lightning-quant`` command."""

from lightning_quant.app import main

if __name__ == "__main__":
    main()
