"""The dense blocks of DlrmHSTU, one file per block (docs/model.md walks through them in order)."""
