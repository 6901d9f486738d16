"""Align3GR as a Kedro project: dual SCID tokenization, multi-task SFT, progressive DPO, evaluation."""

__version__ = "0.1.0"
