"""Operations: the doctor's checks of stores, weights, data and Ray, and the cluster description.

May import the leaves and the domain rooms (it checks what they will need); nothing imports ops
but the CLI and pipeline.
"""
