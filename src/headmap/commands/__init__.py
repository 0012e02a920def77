"""Commands of the ``headmap`` command line beyond ``scan``; each module registers itself on ``headmap.cli.app``."""
