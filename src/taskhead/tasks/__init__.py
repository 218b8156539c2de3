"""One module per task family. Each holds, in order: preprocessing, post-processing, the metric, the module."""
