"""nnunet-launch: nnU-Net v2 inference over every GPU of one machine, unattended."""

__version__ = "0.1.0"
