"""fvlm_pacs: receive CT studies from a PACS, run fVLM, send results back into the study."""

__version__ = "0.1.0"
