"""Denoisers in PyTorch (export and the torch backend only; the runtime never imports this)."""
