"""The adapters (one folder each: config, layers, model) on a frozen backbone, and the
base class they share."""
