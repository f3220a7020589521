"""
Continue a piece of audio with a trained calm model. Read it after train.py: it is the data flow
of calm in one function, wav -> vae.encode -> LM.generate -> vae.decode -> wav.

    python sample.py prompt.wav                       # -> prompt_calm.wav next to the prompt
    python sample.py prompt.flac --seconds 20 --steps 4 --temperature 0.8 --out song.wav

The prompt (any format and rate soundfile reads; stereo is mixed to mono and resampled with soxr)
is encoded by the VAE, continued frame by frame by the language model with its KV cache (one
backbone token and `--steps` head calls per 80 ms frame), and the whole latent sequence is
decoded, so the output wav holds the prompt (as the VAE reconstructs it) followed by the
continuation, with no seam. A prompt longer than the model's context keeps only its last
context-length part. A long generation prints its progress and the time left; Ctrl-C stops it and
writes what was generated so far.

Text (toy runs): `python sample.py --text "flute minor fast" --seconds 8` generates from nothing
(-> out/flute_minor_fast.wav); with a prompt, the text steers the continuation. Words come from
the toy vocabulary (family: flute clarinet string organ bell; mode: major minor; tempo: slow
medium fast), any subset in any order. Guidance is the paper's latent CFG:
z = z_uncond + alpha (z_cond - z_uncond) on the backbone output, one head call per frame. Without
--text a text-conditioned model uses its null condition.

A run trained with `train.py --model rq` or `--model delay` (the discrete baselines of rq.py) is
continued the same way: the checkpoint says which kind it holds; the prompt is quantised into RVQ
codes, the codes are sampled frame by frame (`--temperature`, `--top-k`) and dequantised to
latents for the VAE decoder.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

import calm
import corpus
import data
import pipeline


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('prompt', nargs='?',
                   help='audio file to continue (wav, flac, ogg, ...); optional with --text')
    p.add_argument('--text', help='description to condition on, e.g. "flute minor fast" '
                                  '(text-conditioned runs)')
    p.add_argument('--guidance', type=float, default=1.5,
                   help="latent classifier-free guidance strength alpha, used only with --text "
                        "(default 1.5, pocket-tts's text CFG; 1 = plain conditional sampling, "
                        "0 = unconditional)")
    p.add_argument('--ckpt', default='out/toy',
                   help='run folder with vae.pt and calm.pt (default: out/toy)')
    p.add_argument('--seconds', type=float, default=10.0,
                   help='seconds of continuation to generate (default 10)')
    p.add_argument('--steps', type=int, default=1,
                   help='head steps per frame: consistency steps, flow-map jumps for an LSD '
                        'head, or ODE steps for a TrigFlow head (default 1)')
    p.add_argument('--temperature', type=float, default=None,
                   help="Gaussian temperature (default: the run's; the toy's 0.1, else 0.8); for a "
                        'discrete LM the softmax temperature of its codes (default 0.8)')
    p.add_argument('--around', choices=['noise', 'mean'],
                   help="what the temperature scales: the head's noise variance (the paper's) or "
                        "the sample's spread around the readout's mean estimate (default: the "
                        "run's; the toy's: mean)")
    p.add_argument('--top-k', type=int,
                   help='discrete LMs only: sample each code among the k most likely')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', help='output wav: prompt + continuation (default: <prompt>_calm.wav '
                                 'beside the prompt; without a prompt: out/<text words joined by '
                                 '_>.wav)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    return p.parse_args(argv)


class Progress:
    """Frames generated so far, on stderr: silent for the first few seconds (a short continuation
    prints nothing), then a line every few seconds with the rate and the time left."""

    def __init__(self, total, frame_rate, first=3.0, every=5.0):
        self.total, self.frame_rate, self.first, self.every = total, frame_rate, first, every
        self.t0 = time.time()
        self.next = self.t0 + first

    def __call__(self, done):
        now = time.time()
        if now < self.next or done == self.total:
            return
        self.next = now + self.every
        rate = done / (now - self.t0)
        print(f'generating: {done}/{self.total} frames ({done / self.frame_rate:.1f} of '
              f'{self.total / self.frame_rate:.1f} s) | {rate:.1f} frames/s | ETA '
              f'{corpus.fmt_time((self.total - done) / rate)} (Ctrl-C keeps what is done)',
              file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.prompt is None and args.text is None:
        raise ValueError('give a prompt audio file, or --text "..." to generate from nothing')
    # unknown words: fail before any work
    ids = None if args.text is None else data.tokenize(args.text)
    if ids is not None and not ids:
        raise ValueError(f'--text is empty; vocabulary: {" ".join(data.VOCAB)}')
    if args.prompt is None:
        out = args.out or os.path.join('out', '_'.join(args.text.lower().split()) + '.wav')
    else:
        out = args.out or os.path.splitext(args.prompt)[0] + '_calm.wav'
    if (args.prompt and os.path.exists(args.prompt) and os.path.exists(out)
            and os.path.samefile(args.prompt, out)):
        raise ValueError(f'refusing to overwrite the prompt {args.prompt}: choose another --out')
    if args.seconds <= 0 or args.steps < 1:
        raise ValueError('--seconds must be > 0 and --steps >= 1')
    if args.top_k is not None and args.top_k < 1:
        raise ValueError('--top-k must be >= 1')
    vae, model = pipeline.load(args.ckpt, args.device, args.around)
    if ids is not None and not model.cfg.n_text:
        raise ValueError(f'{args.ckpt} holds an unconditional model (trained without text): '
                         'drop --text')
    model.check_sampling(args.steps, args.top_k)   # options this kind of LM does not take
    sr = vae.cfg.sample_rate
    n_prompt = 0
    if args.prompt:
        wav = data.load_audio(args.prompt, sr)
        n_prompt = len(wav) // vae.hop  # whole frames only: a partial frame would encode silence
        if n_prompt < 1:
            raise ValueError(f'{args.prompt}: the prompt is shorter than one frame '
                             f'({vae.hop / sr * 1000:.0f} ms)')
        if n_prompt > model.cfg.context:
            print(f'prompt is {n_prompt / vae.frame_rate:.1f} s, longer than the model context '
                  f'({model.cfg.context / vae.frame_rate:.1f} s): keeping its last part')
            n_prompt = model.cfg.context
        wav = wav[len(wav) - n_prompt * vae.hop:]
    n_new = max(1, round(args.seconds * vae.frame_rate))

    torch.set_flush_denormal(True)  # CPU: denormal floats made long generations ~20x slower
    torch.manual_seed(args.seed)
    gen = torch.Generator(args.device).manual_seed(args.seed)
    kwargs = {} if args.temperature is None else {'temperature': args.temperature}
    if ids is not None:
        kwargs.update(text=calm.pad_text([ids], model.cfg.n_text), guidance=args.guidance)
    with torch.inference_mode():
        if n_prompt:
            prompt = vae.encode(torch.from_numpy(wav)[None].to(args.device))
        else:   # from nothing: the model starts at its learned start frame
            prompt = torch.zeros(1, 0, vae.cfg.latent_dim, device=args.device)
        t0, frames = time.time(), []
        progress = Progress(n_new, vae.frame_rate)

        def on_frame(x):   # each new frame: kept (an interruption writes them) and counted
            frames.append(x)
            progress(len(frames))
        try:
            new = model.generate(prompt if n_prompt else None, n_new, steps=args.steps,
                                 generator=gen, top_k=args.top_k, on_frame=on_frame, **kwargs)
        except KeyboardInterrupt:   # keep what was generated: the audio so far is written below
            if not frames:
                print('\ninterrupted before the first frame: nothing written', file=sys.stderr)
                sys.exit(130)
            new = torch.stack(frames, 1)
        interrupted, n_new = len(frames) < n_new, len(frames)
        t_gen = time.time() - t0
        audio = vae.decode(torch.cat([vae.quantise(prompt), new], dim=1))[0].float().cpu().numpy()
        t_all = time.time() - t0
    if not np.isfinite(audio).all():
        raise ValueError('the model produced non-finite audio (is the checkpoint trained?)')
    data.write_wav(out, audio, sr)  # written then renamed: an interruption leaves no partial file
    n_clip = int((np.abs(audio) > 1).sum())
    if n_clip:  # 16-bit wav holds [-1, 1]: say so rather than clip silently
        print(f'note: {n_clip} samples ({100 * n_clip / audio.size:.3f}%) beyond [-1, 1] were '
              'clipped', file=sys.stderr)
    secs = n_new / vae.frame_rate
    text = f' | text "{args.text}", guidance {args.guidance:g}' if ids is not None else ''
    print(f'wrote {out}: {n_prompt / vae.frame_rate:.1f} s prompt + {secs:.1f} s continuation '
          f'at {sr} Hz{text}')
    if interrupted:
        print(f'interrupted: the continuation stops after {secs:.1f} of the {args.seconds:g} s '
              'asked for', file=sys.stderr)
        sys.exit(130)
    per_frame = (f'{args.steps} head step(s)' if model.multistep
                 else f'{model.kind} LM, {model.cfg.n_q} codes per frame')
    print(f'generation {t_gen:.2f} s for {secs:.1f} s of audio: real-time factor '
          f'{t_gen / secs:.3f} ({1000 * t_gen / n_new:.1f} ms/frame, {per_frame}); '
          f'with decoding {t_all / secs:.3f}')


if __name__ == '__main__':
    try:
        main()
    except (ValueError, OSError) as e:  # bad input: one clear line, no traceback
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:   # before or after generating: nothing half-written (write_wav)
        print('\ninterrupted: nothing written', file=sys.stderr)
        sys.exit(130)
