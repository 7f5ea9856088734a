"""Train sdtrt's demo checkpoint: a toy-size Stable Diffusion that draws ``a {colour} {shape} on a {colour} background``.

What it makes (``sdtrt/demo/checkpoint/``, a diffusers folder that ``sdtrt init-demo`` copies out):

- ``tokenizer/``: a CLIP-layout BPE tokenizer (256 byte symbols, their ``</w>`` forms, merges, then
  ``<|startoftext|>``/``<|endoftext|>``) whose merges spell every word of the grammar, so each word is one token.
- ``text_encoder/``: ``CLIPTextModel`` (2 layers, width 64), **random and frozen**. Its only job here is to map
  ~90 captions to hidden states the UNet's cross-attention can tell apart; a random causal transformer already
  does (the script checks the smallest distance between two captions' states), and freezing it lets the script
  encode every caption once, so the whole CPU budget goes to the UNet.
- ``vae/``: ``AutoencoderKL``, 8x down, 4 latent channels (as SD), trained first on rendered images
  (L1 + MSE, a tiny KL weight); ``scaling_factor`` is set to 1/std of the latents, so they are unit-variance.
- ``unet/``: ``UNet2DConditionModel`` with cross-attention, trained second on the VAE's latents of a fixed set of
  rendered images: epsilon prediction, SD's scaled-linear betas, Min-SNR-5 loss weights, 12% caption dropout (to
  the empty prompt, which is sdtrt's negative prompt) so classifier-free guidance works; the EMA weights ship.
- ``scheduler/``: DDIM with SD's betas (those the UNet was trained with); see ``configs`` for why not PNDM.

Data (``sdtrt/demo/grammar.py``): 64x64 images (8x8 latents) rendered with Pillow (never downloaded): six colours
with their exact RGB, circles, axis-aligned squares and upright triangles, 35-60% of the side, anywhere inside the image;
shape and background colours differ. ``HELD_OUT`` caption combinations are never rendered for training; the tests
report on them. Not 32x32: at 4x4 latents a shape covers 1.4-2.4 latent pixels, and a VAE trained the same way
rounded squares and triangles into blobs (the tests' checker read the shape kind right from 53% of its
reconstructions of rendered images), which bounds what any UNet can draw.

Cost: run it as ``nice -n 19 .venv/bin/python tools/train_demo_model.py --vae-steps 4000 --vae-minutes 17
--minutes 56`` (it also lowers its own priority and uses one thread): each stage stops at its step count or its
time budget, whichever comes first, with a constant learning rate after warm-up so that a run stopped by the clock
is an ordinary run of that many steps. ``sdtrt/demo/checkpoint/sdtrt_demo.json`` records the steps done, the
minutes (wall and CPU), the machine and its load; ``--vae-steps V --unet-steps U`` with those numbers (and no time
budgets) repeats the shipped weights exactly on a single-threaded CPU, whatever the load. Everything is seeded
(``--seed``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdtrt.checkpoint.tokenizer import _bytes_to_unicode  # CLIP's byte-level alphabet, as sdtrt writes it
from sdtrt.demo.grammar import HELD_OUT, SIZE, WORDS, caption, combos, render

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "sdtrt" / "demo" / "checkpoint"

def render_batch(cs: list[tuple[str, str, str]], rng: np.random.Generator) -> torch.Tensor:
    """(B, 3, H, W) float in [-1, 1]."""
    x = np.stack([render(*c, rng) for c in cs])
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# -- tokenizer ---------------------------------------------------------------------------------------------------
def write_tokenizer(out: Path) -> int:
    """A CLIP-layout tokenizer whose merges build each grammar word left to right; returns its vocabulary size."""
    base = list(_bytes_to_unicode().values())
    base += [s + "</w>" for s in base]
    merges: list[tuple[str, str]] = []
    taken = set(base)
    # Longest words first: a shorter word's merge (``r e`` of "red") must not outrank a longer word's chain
    # ("g r", "gr e", ... of "green"), or BPE would take it first and split the longer word. The script checks.
    for w in sorted(WORDS, key=lambda w: (-len(w), w)):
        syms = list(w[:-1]) + [w[-1] + "</w>"]
        cur = syms[0]
        for nxt in syms[1:]:
            if cur + nxt not in taken:
                merges.append((cur, nxt))
                taken.add(cur + nxt)
            cur += nxt
    tokens = base + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>"}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **specials, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False}
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return len(vocab)


# -- configs -----------------------------------------------------------------------------------------------------
def configs(vocab_size: int) -> dict[str, dict]:
    te = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": vocab_size,
          "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 64,
          "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1, "pad_token_id": vocab_size - 1,
          "initializer_range": 0.02, "initializer_factor": 1.0, "attention_dropout": 0.0, "dropout": 0.0,
          "torch_dtype": "float32"}
    vae = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
           "block_out_channels": [8, 16, 32, 32], "down_block_types": ["DownEncoderBlock2D"] * 4,
           "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 1, "norm_num_groups": 4,
           "act_fn": "silu", "sample_size": SIZE, "scaling_factor": 1.0}
    unet = {"_class_name": "UNet2DConditionModel", "sample_size": SIZE // 8, "in_channels": 4, "out_channels": 4,
            "block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1,
            "attention_head_dim": 8, "cross_attention_dim": 64, "norm_num_groups": 32, "norm_eps": 1e-5,
            "use_linear_projection": False, "upcast_attention": False, "act_fn": "silu",
            "center_input_sample": False, "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
            "mid_block_scale_factor": 1}
    # DDIM, not SD 1.5's PNDM: same betas, but PNDM's 4-step linear multistep overshoots at guidance 7.5 on this
    # model (measured on the tests' 18 prompts: background right in 50% of images with PNDM, 100% with DDIM).
    scheduler = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                 "steps_offset": 1, "clip_sample": False, "prediction_type": "epsilon",
                 "timestep_spacing": "leading", "trained_betas": None}
    return {"text_encoder": te, "vae": vae, "unet": unet, "scheduler": scheduler}


MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None], "feature_extractor": [None, None],
    "requires_safety_checker": False,
}


def machine() -> str:
    """'<CPU model>, <n> cores' from /proc/cpuinfo (Linux), else the platform's processor string."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def log(t0: float, msg: str) -> None:
    print(f"[{(time.time() - t0) / 60:6.1f} min] {msg}", flush=True)


# -- stages ------------------------------------------------------------------------------------------------------
def train_vae(vae, steps: int, batch: int, rng: np.random.Generator, t0: float, minutes: float | None = None,
              lr: float = 1e-3) -> int:
    """Stops after ``steps`` or ``minutes``; returns the steps done (constant learning rate after warm-up, as
    ``train_unet``)."""
    train = combos()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, foreach=True)
    vae.train()
    done = 0
    for step in range(steps):
        if minutes is not None and time.time() - t0 > 60 * minutes:
            log(t0, f"vae: time budget reached after {step} steps")
            break
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50)
        x = render_batch([train[i] for i in rng.integers(0, len(train), batch)], rng)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        if step % 50 == 0 or step == steps - 1:
            log(t0, f"vae {step}/{steps} loss {loss.item():.4f} (kl/px {kl.item():.3f})")
    vae.eval()
    return done


@torch.no_grad()
def encode_dataset(vae, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Latent means and stds (unscaled) of n rendered training images, and each image's caption index."""
    train = combos()
    idx = rng.integers(0, len(train), n)
    means, stds = [], []
    for i in range(0, n, 256):
        post = vae.encode(render_batch([train[j] for j in idx[i:i + 256]], rng)).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds), idx


@torch.no_grad()
def embed(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    """(N, 77, C): token ids exactly as sdtrt's pipeline makes them (bos, tokens, eos, padded with pad)."""
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    ids = [i + [tokenizer.pad_token_id] * (77 - len(i)) for i in ids]
    return text_encoder(torch.tensor(ids)).last_hidden_state


def train_unet(unet, latents, cond, uncond, steps, batch, rng, t0, minutes=None, drop=0.12, ema_decay=0.999) -> int:
    """latents (N, 4, SIZE/8, SIZE/8) already scaled; cond (N, 77, C) per image; uncond (1, 77, C). Stops after ``steps``,
    or once ``minutes`` have passed since ``t0``; returns the steps done. The learning rate is constant after its
    warm-up (the EMA does the averaging), so a run stopped by the clock is the same as one given that many steps."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    snr = (abar / (1 - abar)).float()
    abar = abar.float()
    params = [p for p in unet.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.01, foreach=True)
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**31)))
    unet.train()
    done = 0
    for step in range(steps):
        if minutes is not None and time.time() - t0 > 60 * minutes:
            log(t0, f"unet: time budget reached after {step} steps")
            break
        for g in opt.param_groups:
            g["lr"] = 1e-3 * min(1.0, (step + 1) / 100)
        j = torch.from_numpy(rng.integers(0, latents.shape[0], batch))
        x0 = latents[j]
        c = cond[j].clone()
        dropped = torch.from_numpy(rng.random(batch) < drop)
        c[dropped] = uncond[0]
        t = torch.randint(0, 1000, (batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = unet(xt, t, encoder_hidden_states=c).sample
        w = (snr[t].clamp(max=5.0) / snr[t]).view(-1, 1, 1, 1)  # Min-SNR-5 (Hang et al. 2023) for epsilon
        loss = (w * (pred - eps) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
        done = step + 1
        if step % 200 == 0 or step == steps - 1:
            log(t0, f"unet {step}/{steps} loss {loss.item():.4f}")
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    unet.eval()
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=5000, help="at most this many VAE steps")
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--images", type=int, default=10000, help="rendered images the UNet trains on")
    ap.add_argument("--unet-steps", type=int, default=20000, help="at most this many UNet steps")
    ap.add_argument("--unet-batch", type=int, default=32)
    ap.add_argument("--vae-minutes", type=float, default=None,
                    help="stop VAE training once the run has taken this long (steps done are recorded, as --minutes)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="stop UNet training once the whole run has taken this long (the steps done are recorded; "
                         "pass them as --unet-steps to repeat the run exactly)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    os.nice(19)  # the machine is shared: take only idle CPU
    torch.set_num_threads(1)  # one thread: the same steps give the same weights, whatever the load
    load = [os.getloadavg()[0]]
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vocab_size = write_tokenizer(tmp / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp / "tokenizer"))
    for w in WORDS:
        assert len(tokenizer.tokenize(w)) == 1, (w, tokenizer.tokenize(w))
    cfg = configs(vocab_size)
    te_cfg = {k: v for k, v in cfg["text_encoder"].items() if k not in ("architectures", "model_type", "torch_dtype")}
    text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg)).eval().requires_grad_(False)
    # CLIP's init (std 0.02) leaves every caption's states nearly alike after the final LayerNorm; unit-variance
    # token embeddings make the words dominate the states, so the UNet need not learn to amplify tiny differences.
    text_encoder.get_input_embeddings().weight.data.normal_(0.0, 1.0)
    vae = AutoencoderKL.from_config(cfg["vae"])
    unet = UNet2DConditionModel.from_config(cfg["unet"])
    log(t0, f"params: text encoder {sum(p.numel() for p in text_encoder.parameters()):,}, "
            f"vae {sum(p.numel() for p in vae.parameters()):,}, unet {sum(p.numel() for p in unet.parameters()):,}")

    # 1. Captions -> frozen text encoder states, once. They must be distinguishable for the UNet to follow them.
    train = combos()
    prompts = [caption(*c) for c in train]
    states = embed(text_encoder, tokenizer, prompts)  # (N, 77, 64)
    uncond = embed(text_encoder, tokenizer, [""])  # (1, 77, 64)
    flat = states.flatten(1)
    dist = torch.cdist(flat, flat) + torch.eye(len(flat)) * 1e9
    log(t0, f"caption states: smallest pairwise distance {dist.min().item():.2f} "
            f"(mean norm {flat.norm(dim=1).mean().item():.1f})")

    # 2. The VAE on rendered images.
    vae_steps = train_vae(vae, args.vae_steps, args.vae_batch, rng, t0, minutes=args.vae_minutes, lr=args.vae_lr)
    vae_minutes = (time.time() - t0) / 60
    load.append(os.getloadavg()[0])

    # 3. Latents of a fixed image set; scaling factor = 1/std, as SD's 0.18215 was chosen.
    mean, std, idx = encode_dataset(vae, args.images, rng)
    scale = float(1.0 / mean.std())
    cfg["vae"]["scaling_factor"] = round(scale, 5)
    vae.register_to_config(scaling_factor=cfg["vae"]["scaling_factor"])
    log(t0, f"encoded {args.images} images; latent std {mean.std().item():.3f}, posterior std "
            f"{std.mean().item():.4f}; scaling_factor {cfg['vae']['scaling_factor']}")
    vae.save_pretrained(tmp / "vae")  # now, so that it can be checked while the UNet trains
    gen = torch.Generator().manual_seed(args.seed)
    latents = (mean + std * torch.randn(mean.shape, generator=gen)) * cfg["vae"]["scaling_factor"]

    # 4. The UNet on those latents, with caption dropout for classifier-free guidance.
    unet_steps = train_unet(unet, latents, states[torch.from_numpy(idx)], uncond, args.unet_steps, args.unet_batch,
                            rng, t0, minutes=args.minutes)

    # 5. Write the diffusers folder.
    text_encoder.save_pretrained(tmp / "text_encoder")
    unet.save_pretrained(tmp / "unet")
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg["scheduler"], indent=2) + "\n")
    (tmp / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    load.append(os.getloadavg()[0])
    meta = {"made_by": "tools/train_demo_model.py", "seed": args.seed, "size": SIZE, "vae_steps": vae_steps,
            "vae_batch": args.vae_batch, "vae_lr": args.vae_lr, "images": args.images, "unet_steps": unet_steps,
            "unet_batch": args.unet_batch, "vae_minutes": round(vae_minutes, 1),
            "minutes": round((time.time() - t0) / 60, 1),
            # CPU time this process got: below the minutes when other jobs took the cores (it runs at nice 19)
            "cpu_minutes": round(time.process_time() / 60, 1),
            "load_average_1min": {"start": round(load[0], 2), "after_vae": round(load[1], 2),
                                  "end": round(load[2], 2)},
            "held_out": [caption(*c) for c in HELD_OUT],
            "machine": f"{machine()}, shared with other jobs; one thread, nice 19",
            "torch": torch.__version__}
    (tmp / "sdtrt_demo.json").write_text(json.dumps(meta, indent=2) + "\n")
    for f in tmp.glob("*/*.safetensors"):
        f.chmod(0o644)  # save_pretrained leaves them 0600
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    log(t0, f"wrote {args.out}")


if __name__ == "__main__":
    main()
