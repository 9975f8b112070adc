"""The PyTorch side of `easel bench upscale`: spandrel's RRDBNet (the network ComfyUI 0.3.64's
UpscaleModelLoader builds for ESRGAN files) in 4x-UltraSharp's shape (23 blocks, 64 features;
random weights) upscales a 512² image on the CPU: the first pass, the mean of the timed ones
(the argument) and the process's peak RSS. Needs a Python with torch 2.8 and spandrel.
"""

import resource
import sys
import time

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 2

import torch  # noqa: E402
from spandrel.architectures.ESRGAN import ESRGAN  # noqa: E402


def main():
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    model = ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=4).eval()
    for parameter in model.parameters():
        parameter.normal_(0, 0.02)
    image = torch.rand(1, 3, 512, 512)
    started = time.perf_counter()
    model(image)
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(STEPS):
        model(image)
    mean = (time.perf_counter() - started) / STEPS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
    print(f"| spandrel on PyTorch {torch.__version__} | {first:.2f} | {mean:.2f} | {peak:.2f} |")


if __name__ == "__main__":
    main()
