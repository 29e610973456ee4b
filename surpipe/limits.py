"""Adapter sizes past which a config is refused before anything is allocated.

Torch-free, so that command-line help (which builds option ranges from these) stays light.
"""

MAX_SIZES = {"width": 16384, "nhead": 1024, "dim_feedforward": 262144, "num_layers": 64}
MAX_PARAMETERS = 2**31
