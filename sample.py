"""
Continue a piece of audio with a trained calm model.

    python sample.py prompt.wav                       # -> prompt_calm.wav next to the prompt
    python sample.py prompt.flac --seconds 20 --steps 4 --temperature 0.8 --out song.wav

The prompt (any format and rate soundfile reads; stereo is mixed to mono and resampled with soxr) is
encoded by the VAE, continued frame by frame by the language model with its KV cache (one backbone
token and `--steps` head calls per 80 ms frame), and the whole latent sequence is decoded, so the
output wav holds the prompt (as the VAE reconstructs it) followed by the continuation, with no seam.
A prompt longer than the model's context keeps only its last context-length part.
"""
import argparse
import os
import sys
import time

import numpy as np
import soundfile as sf
import torch

import calm
import data
import vae as vae_lib


def load(run_dir, device='cpu'):
    """(vae, model) from a run folder written by train.py, both in eval mode. The configs travel in the
    checkpoints, so no flag has to repeat them. A run trained with --vae-from finds its VAE through the
    path stored in calm.pt."""
    def read(path):
        if not os.path.isfile(path):
            raise ValueError(f'no checkpoint {path}: train one with `python train.py --toy` or pass --ckpt RUN_DIR')
        return torch.load(path, map_location=device, weights_only=False)

    ck = read(os.path.join(run_dir, 'calm.pt'))
    model = calm.CALM(calm.Config(**ck['config']))
    model.load_state_dict(ck['model'])
    vae_path = os.path.join(run_dir, 'vae.pt')
    vk = read(vae_path if os.path.isfile(vae_path) else ck.get('vae', vae_path))
    vae = vae_lib.VAE(vae_lib.Config(**vk['config']))
    vae.load_state_dict(vk['model'])
    return vae.to(device).eval(), model.to(device).eval()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('prompt', help='audio file to continue (wav, flac, ogg, ...)')
    p.add_argument('--ckpt', default='out/toy', help='run folder with vae.pt and calm.pt (default: out/toy)')
    p.add_argument('--seconds', type=float, default=10.0, help='seconds of continuation to generate (default 10)')
    p.add_argument('--steps', type=int, default=1,
                   help='head steps per frame: consistency steps, or ODE steps for a TrigFlow head (default 1)')
    p.add_argument('--temperature', type=float, default=None,
                   help='Gaussian temperature: variance of the head noise (default: the model config\'s)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', help='output wav: prompt + continuation (default: <prompt>_calm.wav beside the prompt)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = args.out or os.path.splitext(args.prompt)[0] + '_calm.wav'
    if os.path.exists(args.prompt) and os.path.exists(out) and os.path.samefile(args.prompt, out):
        raise ValueError(f'refusing to overwrite the prompt {args.prompt}: choose another --out')
    if args.seconds <= 0 or args.steps < 1:
        raise ValueError('--seconds must be > 0 and --steps >= 1')
    vae, model = load(args.ckpt, args.device)
    sr = vae.cfg.sample_rate
    wav = data.load_audio(args.prompt, sr)
    n_prompt = len(wav) // vae.hop  # whole frames only: a padded partial frame would encode silence
    if n_prompt < 1:
        raise ValueError(f'{args.prompt}: the prompt is shorter than one frame ({vae.hop / sr * 1000:.0f} ms)')
    if n_prompt > model.cfg.context:
        print(f'prompt is {n_prompt / vae.frame_rate:.1f} s, longer than the model context '
              f'({model.cfg.context / vae.frame_rate:.1f} s): keeping its last part')
        n_prompt = model.cfg.context
    wav = wav[len(wav) - n_prompt * vae.hop:]
    n_new = max(1, round(args.seconds * vae.frame_rate))

    torch.set_flush_denormal(True)  # CPU: denormal floats made long generations ~20x slower per frame
    torch.manual_seed(args.seed)
    gen = torch.Generator(args.device).manual_seed(args.seed)
    kwargs = {} if args.temperature is None else {'temperature': args.temperature}
    with torch.inference_mode():
        prompt = vae.encode(torch.from_numpy(wav)[None].to(args.device))
        t0 = time.time()
        new = model.generate(prompt, n_new, steps=args.steps, generator=gen, **kwargs)
        t_gen = time.time() - t0
        audio = vae.decode(torch.cat([prompt, new], dim=1))[0].float().cpu().numpy()
        t_all = time.time() - t0
    if not np.isfinite(audio).all():
        raise ValueError('the model produced non-finite audio (is the checkpoint trained?)')
    # Write then rename: an interrupted run never leaves a half-written file behind.
    tmp = out + '.tmp.wav'
    sf.write(tmp, np.clip(audio, -1, 1), sr, subtype='PCM_16')
    os.replace(tmp, out)
    secs = n_new / vae.frame_rate
    print(f'wrote {out}: {n_prompt / vae.frame_rate:.1f} s prompt + {secs:.1f} s continuation at {sr} Hz')
    print(f'generation {t_gen:.2f} s for {secs:.1f} s of audio: real-time factor {t_gen / secs:.3f} '
          f'({1000 * t_gen / n_new:.1f} ms/frame, {args.steps} head step(s)); with decoding {t_all / secs:.3f}')


if __name__ == '__main__':
    try:
        main()
    except (ValueError, OSError) as e:  # bad input: one clear line, no traceback
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
