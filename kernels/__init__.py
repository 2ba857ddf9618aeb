"""GPU kernels (Triton) for visual scoring and sparse decode attention, shipped as ``vpstudy.kernels``.

Empty until the GPU fast-path issue: each kernel will sit beside the pure-torch reference it is
tested against (``vpstudy.attention`` holds the reference semantics today).
"""
