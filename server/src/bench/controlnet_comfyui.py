"""The PyTorch side of `easel bench controlnet`: ComfyUI's own UNetModel and cldm.ControlNet
in SD1.5's shapes (random weights) take one classifier-free-guidance step (batch 2, 512²)
alone, with one ControlNet and with two chained (their residuals merged as ComfyUI's
`control_merge` does), on the CPU; prints the table row. Needs a ComfyUI checkout in COMFYUI
and a Python with torch 2.8; the number of timed steps (after one warm-up) is the argument.
"""

import os
import sys
import time

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 2
sys.path.insert(0, os.environ["COMFYUI"])
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()

import torch  # noqa: E402

import comfy.controlnet  # noqa: E402
import comfy.ops  # noqa: E402
from comfy.cldm.cldm import ControlNet  # noqa: E402
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402

SD15 = dict(
    image_size=32, in_channels=4, model_channels=320, num_res_blocks=2, channel_mult=[1, 2, 4, 4],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1, context_dim=768, num_heads=8,
    use_spatial_transformer=True, legacy=False, use_linear_in_transformer=False, dtype=torch.float32,
    device="cpu", operations=comfy.ops.disable_weight_init,
)


def main():
    steps = STEPS
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    unet = UNetModel(out_channels=4, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], **SD15)
    net = ControlNet(hint_channels=3, **SD15)
    for module in (unet, net):
        for parameter in module.parameters():
            parameter.normal_(0, 0.02)
    control = comfy.controlnet.ControlNet(net, load_device=torch.device("cpu"))
    x = torch.randn(1, 4, 64, 64).repeat(2, 1, 1, 1)  # cond and uncond take the same latent
    timesteps = torch.tensor([500.0, 500.0])
    context = torch.zeros(2, 77, 768)
    hint = torch.rand(1, 3, 512, 512)

    def step(controls):
        merged = None
        for _ in range(controls):
            merged = control.control_merge(net(x, hint, timesteps, context), merged, None)
        return unet(x, timesteps=timesteps, context=context, control=merged, transformer_options={})

    def timed(controls):
        step(controls)
        started = time.perf_counter()
        for _ in range(steps):
            step(controls)
        return (time.perf_counter() - started) / steps

    plain, one, two = timed(0), timed(1), timed(2)
    print(f"| ComfyUI (PyTorch {torch.__version__}) | {plain:.2f} | {one:.2f} | {one / plain:.2f}× | {two:.2f} | {two / plain:.2f}× |")


if __name__ == "__main__":
    main()
