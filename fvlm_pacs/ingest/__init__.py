"""Getting instances in: DIMSE C-STORE (``scp``), STOW-RS (``dicomweb``), both through ``intake``
into the durable ``spool``."""
