"""The PyTorch side of `easel bench ipadapter`: ComfyUI's own UNetModel in SD1.5's shapes (random
weights) takes one classifier-free-guidance step (batch 2, 512²) alone and with a standard
SD1.5 IP-Adapter (random weights) patched into its cross-attentions by ComfyUI_IPAdapter_plus's
own `ipadapter_execute` (from COMFYUI's custom_nodes); ComfyUI's ClipVisionModel as ViT-H/14
(random weights) encodes one 512² image. Prints the table row. Needs a ComfyUI checkout in
COMFYUI with the pack, and a Python with torch 2.8; the number of timed runs (after one warm-up)
is the argument.
"""

import importlib
import os
import sys
import time

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 2
sys.path.insert(0, os.environ["COMFYUI"])
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()

import torch  # noqa: E402

import comfy.clip_vision  # noqa: E402
import comfy.model_sampling  # noqa: E402
import comfy.ops  # noqa: E402
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402

sys.path.insert(0, os.path.join(os.environ["COMFYUI"], "custom_nodes"))
pack = importlib.import_module("ComfyUI_IPAdapter_plus.IPAdapterPlus")

SD15 = dict(
    image_size=32, in_channels=4, model_channels=320, num_res_blocks=2, channel_mult=[1, 2, 4, 4],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1, context_dim=768, num_heads=8,
    use_spatial_transformer=True, legacy=False, use_linear_in_transformer=False, dtype=torch.float32,
    device="cpu", operations=comfy.ops.disable_weight_init, out_channels=4,
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
)
# The modules' attention widths in the pack's order (input 1, 2, 4, 5, 7, 8, output 3–11, middle).
WIDTHS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280]


class StandInModel:
    """What `ipadapter_execute` reads of a model: its options and its sampling schedule."""

    def __init__(self):
        class Sampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
            pass

        self.sampling = Sampling(None)
        self.model_options = {"transformer_options": {}}

    def get_model_object(self, name):
        return self.sampling


def timed(run):
    run()
    started = time.perf_counter()
    for _ in range(STEPS):
        run()
    return (time.perf_counter() - started) / STEPS


def main():
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    unet = UNetModel(**SD15)
    for parameter in unet.parameters():
        parameter.normal_(0, 0.02)
    state = {"image_proj": {"proj.weight": torch.randn(4 * 768, 1024) * 0.02, "proj.bias": torch.zeros(4 * 768),
                            "norm.weight": torch.ones(768), "norm.bias": torch.zeros(768)},
             "ip_adapter": {}}
    for module, width in enumerate(WIDTHS):
        for kind in ("k", "v"):
            state["ip_adapter"][f"{2 * module + 1}.to_{kind}_ip.weight"] = torch.randn(width, 768) * 0.02
    model = StandInModel()
    pack.ipadapter_execute(model, state, None, pos_embed=torch.randn(1, 1024))
    patched = {"patches_replace": model.model_options["transformer_options"]["patches_replace"],
               "cond_or_uncond": [0, 1]}
    x = torch.randn(1, 4, 64, 64).repeat(2, 1, 1, 1)  # cond and uncond take the same latent
    timesteps = torch.tensor([500.0, 500.0])
    context = torch.zeros(2, 77, 768)
    plain = timed(lambda: unet(x, timesteps=timesteps, context=context, transformer_options={}))
    prompted = timed(lambda: unet(x, timesteps=timesteps, context=context, transformer_options=dict(patched)))
    config = os.path.join(os.environ["COMFYUI"], "comfy", "clip_vision_config_h.json")
    encoder = comfy.clip_vision.ClipVisionModel(config)
    for parameter in encoder.model.parameters():
        parameter.data.normal_(0, 0.02)
    image = torch.rand(1, 512, 512, 3)
    encode = timed(lambda: encoder.encode_image(image))
    print(f"| ComfyUI (PyTorch {torch.__version__}) | {plain:.2f} | {prompted:.2f} | {prompted / plain:.2f}× | "
          f"{encode:.3f} |")


if __name__ == "__main__":
    main()
