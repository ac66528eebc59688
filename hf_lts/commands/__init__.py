"""The ``hf-lts`` commands, one module each (`train`, `eval`, `push`, `export`), with what they share:
argument classes (`arguments`), recipes (`recipes`), loading and checks (`common`) and one-line user errors
(`errors`). `hf_lts.cli` dispatches to them."""
