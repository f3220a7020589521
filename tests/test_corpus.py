"""Your own audio at scale (corpus.py, train.py --data): the file index, lazy crops, the on-disk
latent cache."""
import json
import os
import socket
import sys

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from test_train import TINY, run, tiny_recipes, train_main  # noqa: E402

import corpus  # noqa: E402
import data  # noqa: E402
import vae as vae_lib  # noqa: E402

SR = data.SR
# relative path, rate, channels, seconds: nested folders, three formats, several rates and channel
# counts
FILES = [('spk1/ch1/a.wav', 24000, 1, 3.0), ('spk1/ch2/b.flac', 44100, 2, 2.0),
         ('spk2/c.ogg', 16000, 1, 4.0), ('spk2/deep/er/d.wav', 48000, 2, 1.5)]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread (on a busy machine, handing these small ops between threads
    cost ~0.5 s per VAE call instead of ~1 ms)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write(path, x, sr):
    """sf.write, in blocks: libsndfile 1.2 crashes writing a long ogg/vorbis buffer in one call."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    x = x if x.ndim == 2 else x[:, None]
    with sf.SoundFile(path, 'w', sr, x.shape[1]) as f:
        for i in range(0, len(x), 4096):
            f.write(x[i:i + 4096])


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """Toy melodies as real files, plus a corrupt file, an empty file and a text file."""
    root = tmp_path_factory.mktemp('my_audio')
    for k, (rel, rate, ch, secs) in enumerate(FILES):
        wav = data.make_clip(k, secs).wav.astype(np.float64)
        wav = soxr.resample(wav, SR, rate) if rate != SR else wav
        write(str(root / rel), np.stack([wav * (0.9 - 0.2 * c) for c in range(ch)], 1), rate)
    (root / 'spk1' / 'corrupt.wav').write_bytes(b'RIFF not really a wave file' * 20)
    (root / 'spk2' / 'empty.flac').write_bytes(b'')
    (root / 'spk2' / 'notes.txt').write_text('not audio')
    return root


def test_index_finds_nested_files_and_skips_bad_ones(folder, tmp_path, capsys):
    index = corpus.build_index(str(folder), str(tmp_path / 'index.json'))
    assert index.paths == sorted(f[0] for f in FILES)  # sorted walk, only the readable audio files
    by_path = {f[0]: f for f in FILES}
    for p, frames, rate in zip(index.paths, index.frames, index.rates):
        assert rate == by_path[p][1] and frames == round(by_path[p][3] * rate)
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith('warning: skipping')]
    assert len(warnings) == 2
    assert 'corrupt.wav: unreadable' in out and 'empty.flac: empty file' in out
    assert '4 audio files' in out and '2 skipped' in out


def test_index_is_cached_and_rebuilt_when_the_folder_changes(folder, tmp_path, monkeypatch):
    probed = []
    real_probe = corpus.probe
    monkeypatch.setattr(corpus, 'probe', lambda path,
                        size: probed.append(path) or real_probe(path, size))
    cache = str(tmp_path / 'index.json')
    assert len(corpus.build_index(str(folder), cache, verbose=False)) == 4 and len(probed) == 6
    probed.clear()
    # headers from the cache
    assert len(corpus.build_index(str(folder), cache, verbose=False)) == 4 and probed == []
    extra = folder / 'spk3' / 'new.wav'
    write(str(extra), np.zeros(8000), 16000)
    index = corpus.build_index(str(folder), cache, verbose=False)
    assert len(index) == 5 and probed == [str(extra)]  # only the new file is read
    probed.clear()
    write(str(extra), np.zeros(4000), 16000)  # changed: another size
    index = corpus.build_index(str(folder), cache, verbose=False)
    assert probed == [str(extra)] and index.frames[index.paths.index('spk3/new.wav')] == 4000
    os.remove(extra)
    os.rmdir(folder / 'spk3')
    index = corpus.build_index(str(folder), cache, verbose=False)
    assert index.paths == sorted(f[0] for f in FILES)
    assert len(json.load(open(cache))['files']) == 6


def test_read_segment_is_load_audio_sliced(folder):
    """A crop read with seek + per-crop resampling is the same part of the whole file read and
    resampled at once: exactly at the model's rate, to float32 rounding otherwise (the read starts
    on a sample that is on both rates' grids, so crop and whole file are resampled at the same
    instants)."""
    index = corpus.build_index(str(folder), verbose=False)
    for i, rel in enumerate(index.paths):
        whole = data.load_audio(folder / rel)
        n = int(index.n_samples(SR)[i])
        assert abs(len(whole) - n) <= 1
        # the last one runs past the end
        for start, count in ((0, 5000), (n // 3, 4000), (n - 1000, 3000)):
            crop = index.read(i, start, count, SR)
            ref = np.zeros(count, np.float32)
            piece = whole[start:start + count]
            ref[:len(piece)] = piece
            if index.rates[i] == SR:
                assert np.array_equal(crop, ref), rel
            else:
                assert np.abs(crop - ref).max() < 1e-5, rel


def test_crops_are_a_pure_function_of_the_step_across_a_resume_and_workers(folder):
    index = corpus.build_index(str(folder), verbose=False)
    ds = corpus.CropDataset(index, seed=3, batch=4, length=6000, sr=SR)
    fresh = corpus.CropLoader(ds, workers=0)
    straight = [fresh(s) for s in range(6)]
    assert not torch.equal(straight[0], straight[1])
    resumed = corpus.CropLoader(ds, workers=2)  # a resumed run starts at step 3, with DataLoader
                                                # workers
    assert all(torch.equal(resumed(s), straight[s]) for s in range(3, 6))
    assert torch.equal(fresh(2), straight[2])  # asking for an earlier step restarts at that step
    other = corpus.CropDataset(index, seed=3, batch=4, length=6000, sr=SR, rank=1)
    assert not torch.equal(other[0], straight[0])  # DDP ranks see different crops


def test_crops_draw_files_in_proportion_to_their_duration():
    # two files at the model's rate, one 9x longer: ~90% of the crops must come from it
    index = corpus.Index('/nowhere', ['long.wav', 'short.wav'], [9 * SR, SR], [SR, SR])
    index.read = lambda i, start, n, sr: np.full(n, float(i), np.float32)
    ds = corpus.CropDataset(index, seed=0, batch=50, length=100, sr=SR)
    share = np.mean([float((ds[s][:, 0] == 0).float().mean()) for s in range(20)])
    assert 0.85 < share < 0.95


def small_vae(**kw):
    torch.manual_seed(0)
    cfg = vae_lib.Config(ratios=(4, 4), channels=4, max_channels=8, latent_dim=3, d_model=16,
                         n_heads=2, n_transformer_layers=2, context=3, **kw)
    return vae_lib.VAE(cfg).eval()


@pytest.mark.parametrize('kind', ['seanet', 'stft'])
def test_chunked_encoding_equals_one_pass(kind):
    """A causal encoder: chunks with left_context_frames of context give the latents of one pass."""
    vae = small_vae(stft_hop=4) if kind == 'stft' else small_vae()
    wav = 0.3 * torch.randn(200 * vae.hop + 7, generator=torch.Generator().manual_seed(1)).numpy()
    one_pass = vae.encode(torch.from_numpy(wav)[None])[0]
    ctx = corpus.left_context_frames(vae)
    read = lambda a, c: wav[a:a + c]
    chunked = torch.cat(list(corpus.encode_chunks(vae, read, len(wav), 'cpu', 16, ctx)))
    assert chunked.shape == one_pass.shape == (201, 3)
    torch.testing.assert_close(chunked, one_pass, atol=1e-5, rtol=1e-5)
    short = torch.cat(list(corpus.encode_chunks(vae, read, len(wav), 'cpu', 16, ctx // 3)))
    assert (short - one_pass).abs().max() > 1e-3  # too little context differs: the check can fail
    padded = torch.cat(list(corpus.encode_chunks(vae, read, len(wav), 'cpu', 16, ctx, bucket=5)))
    # right padding is never seen
    torch.testing.assert_close(padded, one_pass, atol=1e-5, rtol=1e-5)


def sources(n=5):
    rng = np.random.default_rng(0)
    wavs = [(0.3 * rng.standard_normal(int(rng.integers(1, 40)) * 16 + int(rng.integers(16))))
            .astype(np.float32) for _ in range(n)]
    return wavs, [len(w) for w in wavs], lambda i, a, c: wavs[i][a:a + c]


@pytest.mark.parametrize('dtype', [np.float32, np.float16])
def test_latent_cache_round_trips_exactly(tmp_path, dtype):
    vae = small_vae()
    wavs, lengths, read = sources()
    # bucket=1: vae.encode on each whole source, as the toy encodes (padding would change float32
    # rounding)
    cache = corpus.encode_latents(vae, lengths, read, str(tmp_path / 'lat'), dtype=dtype, bucket=1,
                                  verbose=False)
    again = corpus.LatentCache(str(tmp_path / 'lat'))  # reopened from disk
    padded = corpus.encode_latents(vae, lengths, read, str(tmp_path / 'pad'), dtype=dtype,
                                   verbose=False)
    assert len(cache) == len(again) == len(padded) == len(wavs)
    for i, w in enumerate(wavs):
        ref = vae.encode(torch.from_numpy(w)[None])[0].numpy().astype(dtype)
        assert cache[i].dtype == dtype
        assert np.array_equal(cache[i], ref) and np.array_equal(again[i], ref)
        # float16: 1 ulp
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=2e-3, atol=1e-3)
        np.testing.assert_allclose(padded[i].astype(np.float32), ref.astype(np.float32), **tol)
    assert list(cache.lengths) == [vae.n_frames(n) for n in lengths]


@pytest.mark.parametrize('bucket', [1, 16])
def test_batched_encoding_equals_one_source_at_a_time(tmp_path, bucket):
    """batch > 1 (the toy's equal-length clips): runs of one length go through vae.encode together;
    a source of another length in between splits the run. The latents match one-at-a-time
    encoding."""
    vae = small_vae()
    rng = np.random.default_rng(1)
    wavs = [(0.3 * rng.standard_normal(n)).astype(np.float32)
            for n in [400] * 3 + [333] + [400] * 4]
    lengths, read = [len(w) for w in wavs], lambda i, a, c: wavs[i][a:a + c]
    calls = []
    encode = vae.encode
    vae.encode = lambda x: calls.append(x.shape[0]) or encode(x)
    one = corpus.encode_latents(vae, lengths, read, str(tmp_path / 'one'), bucket=bucket,
                                verbose=False)
    assert calls == [1] * 8
    calls.clear()
    batched = corpus.encode_latents(vae, lengths, read, str(tmp_path / 'b'), bucket=bucket,
                                    verbose=False, batch=3)
    assert calls == [3, 1, 3, 1]
    for i in range(len(wavs)):
        np.testing.assert_allclose(batched[i], one[i], rtol=1e-5, atol=1e-5)


def test_interrupted_encoding_resumes_to_the_same_cache(tmp_path):
    vae = small_vae()
    _, lengths, read = sources(6)
    corpus.encode_latents(vae, lengths, read, str(tmp_path / 'full'), verbose=False)
    calls = []

    def dies_at_source_3(i, a, c):
        calls.append(i)
        if i == 3:
            raise KeyboardInterrupt
        return read(i, a, c)
    with pytest.raises(SystemExit):
        corpus.encode_latents(vae, lengths, dies_at_source_3, str(tmp_path / 'cut'), verbose=False)
    assert list(np.fromfile(tmp_path / 'cut.done', np.uint8)) == [1, 1, 1, 0, 0, 0]
    calls.clear()
    corpus.encode_latents(vae, lengths, lambda i, a, c: calls.append(i) or read(i, a, c),
                          str(tmp_path / 'cut'), verbose=False)
    assert sorted(set(calls)) == [3, 4, 5]  # only what was missing is encoded
    for ext in ('.npy', '.json', '.done'):
        assert (tmp_path / f'full{ext}').read_bytes() == (tmp_path / f'cut{ext}').read_bytes()
    calls.clear()
    corpus.encode_latents(vae, lengths, lambda i, a, c: calls.append(i) or read(i, a, c),
                          str(tmp_path / 'cut'), verbose=False)
    assert calls == []  # complete: nothing re-encoded
    other = small_vae()
    with torch.no_grad():
        other.latent_std.fill_(2.0)  # another VAE: the cache is rebuilt
    corpus.encode_latents(other, lengths, lambda i, a, c: calls.append(i) or read(i, a, c),
                          str(tmp_path / 'cut'), verbose=False)
    assert sorted(set(calls)) == list(range(6))


def test_windows_from_the_cache_equal_windows_from_a_list(tmp_path):
    """The toy's LM batches are the same whether its latents sit in a list in memory or in the
    float32 cache."""
    vae = small_vae()
    _, lengths, read = sources(8)
    cache = corpus.encode_latents(vae, lengths, read, str(tmp_path / 'lat'), verbose=False)
    listed = [torch.from_numpy(np.array(cache[i])) for i in range(len(cache))]
    for step in range(5):
        assert torch.equal(corpus.window_batch(cache, step, 0, 6, 10),
                           corpus.window_batch(listed, step, 0, 6, 10))
    weighted = corpus.LatentCache(str(tmp_path / 'lat'), by_length=True)
    assert weighted.cum[-1] == sum(cache.lengths)
    assert corpus.window_batch(weighted, 0, 0, 6, 10).shape == (6, 10, 3)


def data_args(folder, out, *extra):
    return ['--data', str(folder), '--out', str(out), '--workers', '2', *extra, *TINY]


def test_train_on_a_nested_folder_reports_bad_files(folder, tmp_path, monkeypatch, capsys):
    tiny_recipes(monkeypatch)
    out = tmp_path / 'run'
    train_main(data_args(folder, out, '--vae-steps', '3', '--lm-steps', '3'))
    printed = capsys.readouterr().out
    assert printed.count('warning: skipping') == 2 and '(2 skipped' in printed
    records = [json.loads(line) for line in open(out / 'log.jsonl')]
    assert [r['step'] for r in records if r['stage'] == 'vae'] == [1, 2, 3]
    assert [r['step'] for r in records if r['stage'] == 'lm' and 'val_mse' not in r] == [1, 2, 3]
    cache = corpus.LatentCache(str(out / 'latents'))
    meta = json.load(open(out / 'latents.json'))
    assert cache.array.dtype == np.float16 and meta['names'] == sorted(f[0] for f in FILES)
    assert list(cache.lengths) == [-(-round(f[3] * SR) // 1920) for f in sorted(FILES)]
    assert os.path.exists(out / 'index.json')


def test_data_resume_equals_uninterrupted(folder, tmp_path, monkeypatch):
    """--data: crops read by workers at step s are the same after a resume, so the weights are too.
    """
    tiny_recipes(monkeypatch)
    full, cut = tmp_path / 'full', tmp_path / 'cut'
    common = ['--vae-steps', '3', '--lm-steps', '3', '--ckpt-every', '1']
    train_main(data_args(folder, full, *common))
    train_main(data_args(folder, cut, '--stop-after', '2', *common))
    train_main(data_args(folder, cut, '--stop-after', '2', '--resume', *common))
    train_main(data_args(folder, cut, '--resume', *common))
    for name in ('vae.pt', 'calm.pt'):
        a = torch.load(full / name, weights_only=False)
        b = torch.load(cut / name, weights_only=False)
        assert a['step'] == b['step'] == 3
        for k in a['model']:
            assert torch.equal(a['model'][k], b['model'][k]), (name, k)


def test_empty_or_missing_data_folder_is_one_line_error(tmp_path):
    (tmp_path / 'only_text').mkdir()
    (tmp_path / 'only_text' / 'a.txt').write_text('x')
    for bad in (tmp_path / 'missing', tmp_path / 'only_text'):
        with pytest.raises(SystemExit) as e:
            train_main(['--data', str(bad), '--out', str(tmp_path / 'run')])
        assert str(e.value).startswith('error:') and '\n' not in str(e.value)


def test_ddp_ranks_encode_their_share_into_one_cache(folder, tmp_path):
    """torchrun, 2 CPU processes: each rank encodes every other file into the shared cache, which
    equals the cache one process makes with the same VAE; the replicas stay identical."""
    out = tmp_path / 'ddp'
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    r = run('-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}',
            'train.py', *data_args(folder, out, '--vae-steps', '2', '--lm-steps', '2'))
    assert 'encode: 2 of 4 sources (rank 0 of 2)' in r.stdout
    assert r.stdout.count('warning: skipping') == 2
    diffs = [json.loads(line).get('replica_max_abs_diff') for line in open(out / 'log.jsonl')]
    assert [d for d in diffs if d is not None] == [0.0, 0.0]
    vae, _ = vae_lib.load(str(out / 'vae.pt'), 'cpu')
    index = corpus.build_index(str(folder), verbose=False)
    single = corpus.encode_all(vae, index, len(index), str(tmp_path / 'single'), 'cpu')
    assert np.array_equal(np.asarray(single.array), np.load(out / 'latents.npy'))
