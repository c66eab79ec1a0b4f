"""Human preference labels for D3PO: sample image sets with their trajectories, then label them in a browser.

Workflow::

    flowalign label runs/pairs --prepare --model shapes-sd3 --prompts shapes-train --num-prompts 40 --n 2
    flowalign label runs/pairs                      # http://127.0.0.1:8765/ : pick the better image
    flowalign train configs/d3po/shapes.yaml labels=runs/pairs

**The folder** (written by :func:`prepare`)::

    manifest.json             sampling settings and the prompt list; written last, so a folder without it is an
                              interrupted preparation
    trajectories/NNNNN.pt     prompt NNNNN's n trajectories: latents (n, T+1, ...), log_probs (n, T), sigmas (T+1,),
                              stochastic (T,); D3PO recomputes their step log-probs under the policy and reference
    images/NNNNN-K.png        sample K (0-based) of prompt NNNNN (.gif for video models)
    labels.jsonl              the labels, one JSON object appended per choice

Every sample of a prompt starts from the same initial noise (D3PO), so the images differ only by the SDE noise.

**The labels file** (JSON Lines, UTF-8, one object per line, blank lines ignored)::

    {"prompt_index": 3, "prompt": "a red circle", "choice": 1, "time": "2025-05-01T12:00:00Z"}

- ``prompt_index``: 0-based position of the prompt in ``manifest.json``'s ``"prompts"``. It may be left out when
  ``prompt`` names a prompt that occurs exactly once in the manifest.
- ``prompt``: the prompt text. When given it must equal the manifest's prompt at ``prompt_index``.
- ``choice``: 0-based index of the preferred sample (its image is ``images/NNNNN-K.png`` with ``K = choice``), or
  ``null`` for "no preference": the prompt counts as labelled but gives no pair.
- ``scores``: instead of ``choice``, a list of n numbers, higher is better (D3PO's per-image labels such as
  ``[0, 0, 1, 0, 0, 1, 1]`` for 7 images). Every pair with different scores is a preference; equal scores are
  ties and are skipped.
- Any other key (``time``, ``annotator``) is kept in the file and ignored.

A later line for the same prompt replaces an earlier one, so re-labelling appends and nothing is ever rewritten.
With ``choice = K`` the preferred pairs are (K, j) for every other sample j.

**Robustness.** The server appends each label as one line, then flushes and fsyncs before answering the page, and
writes under a lock, so existing labels are never lost or interleaved. A server killed in the middle of a write
can leave a last line without its newline: on start the server completes it if it is valid JSON, and otherwise
moves the partial bytes to ``labels.jsonl.partial`` and cuts them from the file (that one choice is asked again).
A bad line anywhere else stops the server and the trainer with an error naming the file and the line; the
trainer reports a truncated last line the same way (start the server once to set it aside, or delete it).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
LABELS = "labels.jsonl"
TRAJECTORIES = "trajectories"
IMAGES = "images"
PAGE = "label_page.html"
FORMAT_VERSION = 1
DEFAULT_PORT = 8765


class LabelsError(ValueError):
    """A labels file or labelling folder that cannot be used; the message names the file and line."""


# ----------------------------------------------------------------------------- preparing a folder
def prepare(folder: str | os.PathLike, model: Any = "shapes-sd3", prompts: str | list[str] = "shapes-train",
            num_prompts: int | None = 32, n: int = 2, num_steps: int = 10, sampler: str = "flow-sde",
            eta: float | None = None, guidance_scale: float | None = None, height: int | None = None,
            width: int | None = None, num_frames: int | None = None, seed: int = 0, batch_size: int = 8,
            device: str | None = None, progress: bool = True) -> Path:
    """Sample ``n`` images per prompt from one shared initial noise with a stochastic sampler and write the
    labelling folder (module doc): trajectories, images and ``manifest.json``.

    ``prompts`` is a list or a prompt source (``shapes-train``, ``shapes-test``, a ``.txt`` or ``.jsonl`` file);
    ``num_prompts`` keeps the first that many (null: all). A folder that already holds a manifest is refused, so
    a finished set and its labels are never overwritten.
    """
    import flowalign as fa
    from flowalign.io import save_image, save_video
    from flowalign.trainers.data import load_prompts

    folder = Path(folder)
    if (folder / MANIFEST).exists():
        raise FileExistsError(f"{folder} already holds a prepared set ({folder / MANIFEST}); it and its labels are "
                              f"left untouched. Prepare into a new folder.")
    if sampler == "ode":
        raise ValueError("D3PO needs per-step log-probs: prepare with a stochastic sampler (flow-sde, dance-sde, cps).")
    if n < 2:
        raise ValueError(f"n={n}: a preference needs at least 2 samples per prompt.")
    prompt_list = list(prompts) if isinstance(prompts, (list, tuple)) else load_prompts(prompts, num_prompts)
    if num_prompts:
        prompt_list = prompt_list[:num_prompts]
    if not prompt_list:
        raise ValueError("No prompts to prepare.")
    m = fa.load_model(model, device=device)
    if m.family == "toy2d":
        raise ValueError("toy2d samples are 2-D points, not pictures: human labels need an image or video model.")
    (folder / TRAJECTORIES).mkdir(parents=True, exist_ok=True)
    (folder / IMAGES).mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    from tqdm.auto import tqdm

    ext, traj = "png", None
    chunk = max(1, batch_size // n)
    for start in tqdm(range(0, len(prompt_list), chunk), desc="preparing", disable=not progress):
        part = prompt_list[start:start + chunk]
        traj = fa.sample(m, part, num_steps=num_steps, sampler=sampler, eta=eta, guidance_scale=guidance_scale,
                         height=height, width=width, num_frames=num_frames, generator=gen, num_images_per_prompt=n,
                         same_noise_per_prompt=True)
        images = traj.images.float().cpu()
        ext = "gif" if images.ndim == 5 else "png"
        for p in range(len(part)):
            i = start + p
            rows = slice(p * n, (p + 1) * n)
            torch.save({"latents": traj.latents[rows].cpu(), "log_probs": traj.log_probs[rows].cpu(),
                        "sigmas": traj.sigmas.cpu(), "stochastic": traj.stochastic.cpu()},
                       folder / TRAJECTORIES / f"{i:05d}.pt")
            for k in range(n):
                path = folder / IMAGES / f"{i:05d}-{k}.{ext}"
                save_video(images[p * n + k], path) if ext == "gif" else save_image(images[p * n + k], path)
    manifest = {"version": FORMAT_VERSION, "model": model if isinstance(model, str) else m.family,
                "family": m.family, "n": n, "prompts": prompt_list, "image_ext": ext, "seed": seed,
                "same_noise": True, **traj.settings(),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)
    return folder


def read_manifest(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a prepared labelling folder (no {MANIFEST}); make one with "
                                f"`flowalign label {folder} --prepare --model ... --prompts ...`.")
    manifest = json.loads(path.read_text())
    if manifest.get("version") != FORMAT_VERSION:
        raise LabelsError(f"{path}: format version {manifest.get('version')!r}, this flowalign reads "
                          f"{FORMAT_VERSION}.")
    return manifest


# ----------------------------------------------------------------------------- reading labels
def recover_tail(path: str | os.PathLike) -> str | None:
    """Repair a last line cut short by a killed writer (module doc). Returns what was done, or None."""
    path = Path(path)
    if not path.is_file():
        return None
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return None
    cut = data.rfind(b"\n") + 1
    tail = data[cut:]
    try:
        json.loads(tail.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        aside = path.with_name(path.name + ".partial")
        with open(aside, "ab") as f:
            f.write(tail + b"\n")
            f.flush()
            os.fsync(f.fileno())
        with open(path, "r+b") as f:
            f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())
        line = data[:cut].count(b"\n") + 1
        return (f"{path}: line {line} was cut short ({len(tail)} bytes, probably a server killed mid-write); "
                f"moved it to {aside}. That prompt will be asked again.")
    with open(path, "ab") as f:
        f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())
    return f"{path}: the last line lacked its newline; completed it."


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_label(obj: Any, manifest: dict, where: str) -> tuple[int, dict]:
    """Check one labels-file record against the manifest; returns ``(prompt_index, record)``."""
    prompts, n = manifest["prompts"], manifest["n"]
    if not isinstance(obj, dict):
        raise LabelsError(f"{where}: expected a JSON object like {{\"prompt_index\": 0, \"choice\": 1}}, got "
                          f"{type(obj).__name__}.")
    idx = obj.get("prompt_index")
    text = obj.get("prompt")
    if text is not None and not isinstance(text, str):
        raise LabelsError(f"{where}: \"prompt\" must be a string, got {text!r}.")
    if idx is None:
        if text is None:
            raise LabelsError(f"{where}: give \"prompt_index\" (0-based, into manifest.json's prompts) or \"prompt\".")
        hits = [i for i, p in enumerate(prompts) if p == text]
        if not hits:
            raise LabelsError(f"{where}: unknown prompt {text!r}: it is not among the folder's {len(prompts)} prompts.")
        if len(hits) > 1:
            raise LabelsError(f"{where}: prompt {text!r} occurs {len(hits)} times in the manifest (indices "
                              f"{hits[:5]}); give \"prompt_index\" too.")
        idx = hits[0]
    if not _int(idx):
        raise LabelsError(f"{where}: \"prompt_index\" must be an integer, got {idx!r}.")
    if not 0 <= idx < len(prompts):
        raise LabelsError(f"{where}: prompt_index {idx} is out of range: the folder holds prompts "
                          f"0..{len(prompts) - 1}.")
    if text is not None and text != prompts[idx]:
        raise LabelsError(f"{where}: unknown prompt {text!r} for prompt_index {idx}: the manifest's prompt {idx} is "
                          f"{prompts[idx]!r} (labels of another folder?).")
    has_choice, has_scores = "choice" in obj, "scores" in obj
    if has_choice == has_scores:
        raise LabelsError(f"{where}: give exactly one of \"choice\" (0-based sample index, or null for no preference) "
                          f"and \"scores\" (a list of {n} numbers).")
    if has_choice:
        choice = obj["choice"]
        if choice is not None and not _int(choice):
            raise LabelsError(f"{where}: \"choice\" must be a sample index 0..{n - 1} or null, got {choice!r}.")
        if choice is not None and not 0 <= choice < n:
            raise LabelsError(f"{where}: choice {choice} is out of range: prompt {idx} has samples 0..{n - 1}.")
        scores = None if choice is None else [1.0 if k == choice else 0.0 for k in range(n)]
    else:
        scores = obj["scores"]
        if (not isinstance(scores, list) or len(scores) != n
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
                           for s in scores)):
            raise LabelsError(f"{where}: \"scores\" must be a list of {n} finite numbers (one per sample), got "
                              f"{scores!r}.")
        scores = [float(s) for s in scores]
    return idx, {"prompt_index": idx, "choice": obj.get("choice"), "scores": scores}


def read_labels(path: str | os.PathLike, manifest: dict, missing_ok: bool = False) -> dict[int, dict]:
    """The labels of a file, checked line by line: ``{prompt_index: record}`` (the last line of a prompt wins).
    Any bad line raises :class:`LabelsError` naming ``file:line``."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return {}
        raise FileNotFoundError(f"Labels file {path} does not exist; label the folder with `flowalign label "
                                f"{path.parent}` first.")
    data = path.read_bytes()
    lines = data.split(b"\n")
    out: dict[int, dict] = {}
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if number == len(lines) and not data.endswith(b"\n"):
                raise LabelsError(f"{where}: the last line is incomplete ({raw[:60]!r}...): the labelling server was "
                                  f"probably killed mid-write. Run `flowalign label {path.parent}` once (it sets the "
                                  f"partial line aside in {path.name}.partial) or delete that line.") from None
            raise LabelsError(f"{where}: not valid JSON ({e.msg} at column {e.colno}): {raw[:80]!r}. Fix or delete "
                              f"the line.") from None
        idx, record = parse_label(obj, manifest, where)
        out[idx] = record
    return out


def label_pairs(labels: dict[int, dict]) -> list[tuple[int, int, int]]:
    """``(prompt_index, winner, loser)`` sample pairs of the labels (ties and "no preference" give none)."""
    pairs = []
    for idx in sorted(labels):
        scores = labels[idx]["scores"]
        if scores is None:
            continue
        for i in range(len(scores)):
            for j in range(len(scores)):
                if scores[i] > scores[j]:
                    pairs.append((idx, i, j))
    return pairs


def resolve(labels: str | os.PathLike, folder: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """``(folder, labels file)`` of a ``labels`` setting: a prepared folder (its labels.jsonl) or a labels file
    (its folder is ``folder`` or the file's parent)."""
    path = Path(labels)
    if path.is_dir():
        return (Path(folder) if folder else path), path / LABELS
    return (Path(folder) if folder else path.parent), path


@dataclasses.dataclass
class LabelledSet:
    """A labelled folder ready for D3PO: the labelled prompts' trajectories and the preferred pairs."""

    folder: Path
    labels_path: Path
    manifest: dict
    prompt_indices: list[int]         # the labelled prompts with at least one pair, in order
    winners: torch.Tensor             # (P,) rows of the trajectory batch (prompt slot * n + sample)
    losers: torch.Tensor
    groups: torch.Tensor              # (P,) the prompt slot of each pair

    def trajectory(self, model):
        """The labelled prompts' trajectories as one :class:`~flowalign.sampling.sampler.Trajectory` (rows
        ``slot * n + k``), conditioning re-encoded by ``model``."""
        from flowalign.sampling.sampler import Trajectory

        m, n = self.manifest, self.manifest["n"]
        parts = []
        for i in self.prompt_indices:
            file = self.folder / TRAJECTORIES / f"{i:05d}.pt"
            if not file.is_file():
                raise LabelsError(f"{file} is missing: the folder {self.folder} is incomplete (prompt {i} is "
                                  f"labelled but its trajectories are gone).")
            parts.append(torch.load(file, map_location="cpu", weights_only=True))
        prompts = [m["prompts"][i] for i in self.prompt_indices]
        cond = model.encode(prompts, guidance_scale=m["guidance_scale"]).repeat_interleave(n)
        sigmas = parts[0]["sigmas"].float()
        expected = model.sigmas(m["num_steps"], m["height"], m["width"], m["num_frames"]).float().cpu()
        if sigmas.shape != expected.shape or not torch.allclose(sigmas, expected, atol=1e-6):
            raise LabelsError(f"{self.folder}: its trajectories were sampled on another noise schedule than this "
                              f"model's ({m['num_steps']} steps); prepare the folder with the model you train.")
        return Trajectory(latents=torch.cat([p["latents"] for p in parts]).float(), sigmas=parts[0]["sigmas"],
                          log_probs=torch.cat([p["log_probs"] for p in parts]).float(),
                          stochastic=parts[0]["stochastic"], cond=cond, prompts=[q for q in prompts for _ in range(n)],
                          sampler=m["sampler"], eta=m["eta"], guidance_scale=m["guidance_scale"], height=m["height"],
                          width=m["width"], num_frames=m["num_frames"])


def load_labelled(labels: str | os.PathLike, folder: str | os.PathLike | None = None) -> LabelledSet:
    """Read and check a labelled folder for training (:class:`LabelsError` on any bad line; no pairs is an
    error too)."""
    folder, labels_path = resolve(labels, folder)
    manifest = read_manifest(folder)
    records = read_labels(labels_path, manifest)
    pairs = label_pairs(records)
    if not pairs:
        raise LabelsError(f"{labels_path} holds no preference ({len(records)} labelled prompts, all without a "
                          f"choice): label some prompts with `flowalign label {folder}`.")
    indices = sorted({p for p, _, _ in pairs})
    slot = {p: s for s, p in enumerate(indices)}
    n = manifest["n"]
    return LabelledSet(folder=folder, labels_path=labels_path, manifest=manifest, prompt_indices=indices,
                       winners=torch.tensor([slot[p] * n + w for p, w, _ in pairs]),
                       losers=torch.tensor([slot[p] * n + lo for p, _, lo in pairs]),
                       groups=torch.tensor([slot[p] for p, _, _ in pairs]))


# ----------------------------------------------------------------------------- the labelling server
class LabelStore:
    """A folder's labels for the server: checks the file at start (recovering a cut-short last line), appends each
    new label durably under a lock."""

    def __init__(self, folder: str | os.PathLike, labels: str | os.PathLike | None = None):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.path = Path(labels) if labels else self.folder / LABELS
        self.recovered = recover_tail(self.path)
        self.labels = read_labels(self.path, self.manifest, missing_ok=True)
        self.lock = threading.Lock()

    @property
    def n(self) -> int:
        return self.manifest["n"]

    def next_unlabelled(self) -> int | None:
        return next((i for i in range(len(self.manifest["prompts"])) if i not in self.labels), None)

    def choices(self) -> dict[str, int | None]:
        """The page's view of each label: the chosen sample, None for "no preference"; a ``scores`` line (written by
        hand) shows its best-scored sample."""
        out = {}
        for i, r in self.labels.items():
            scores = r["scores"]
            out[str(i)] = None if scores is None else max(range(self.n), key=lambda k: scores[k])
        return out

    def state(self) -> dict:
        m = self.manifest
        ext = m.get("image_ext", "png")
        return {"prompts": m["prompts"], "n": self.n, "labels": self.choices(), "next": self.next_unlabelled(),
                "labels_file": str(self.path), "folder": str(self.folder),
                "images": [[f"/images/{i:05d}-{k}.{ext}" for k in range(self.n)] for i in range(len(m["prompts"]))]}

    def add(self, obj: Any) -> dict:
        """Check a label from the page, append it (flush + fsync) and return the new state."""
        with self.lock:
            idx, record = parse_label(obj, self.manifest, "label")
            if "choice" not in obj:
                raise LabelsError("label: the page sends {\"prompt_index\": i, \"choice\": k or null}.")
            line = {"prompt_index": idx, "prompt": self.manifest["prompts"][idx], "choice": obj["choice"],
                    "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.labels[idx] = record
            return self.state()


_IMAGE_NAME = re.compile(r"^\d{5}-\d+\.(png|gif)$")


def _page() -> bytes:
    from importlib import resources

    return resources.files("flowalign").joinpath(PAGE).read_bytes()


def _handler(store: LabelStore):
    class Handler(BaseHTTPRequestHandler):
        server_version = "flowalign-label"

        def log_message(self, format, *args):  # noqa: A002 - quiet: the terminal shows one line per label instead
            pass

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: Any) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json")

        def do_GET(self):  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                return self._send(HTTPStatus.OK, _page(), "text/html; charset=utf-8")
            if path == "/api/state":
                with store.lock:
                    return self._json(HTTPStatus.OK, store.state())
            if path.startswith("/images/"):
                name = path[len("/images/"):]
                file = store.folder / IMAGES / name
                if _IMAGE_NAME.match(name) and file.is_file():
                    return self._send(HTTPStatus.OK, file.read_bytes(), "image/" + name.rsplit(".", 1)[1])
            self._json(HTTPStatus.NOT_FOUND, {"error": f"not found: {path}"})

        def do_POST(self):  # noqa: N802
            if self.path != "/api/label":
                return self._json(HTTPStatus.NOT_FOUND, {"error": f"not found: {self.path}"})
            size = int(self.headers.get("Content-Length") or 0)
            if not 0 < size <= 65536:
                return self._json(HTTPStatus.BAD_REQUEST, {"error": "expected a small JSON body"})
            try:
                obj = json.loads(self.rfile.read(size).decode("utf-8"))
                state = store.add(obj)
            except (LabelsError, json.JSONDecodeError, UnicodeDecodeError) as e:
                return self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            self._json(HTTPStatus.OK, state)

    return Handler


def make_server(folder: str | os.PathLike, port: int = DEFAULT_PORT, labels: str | os.PathLike | None = None
                ) -> ThreadingHTTPServer:
    """A labelling server on ``127.0.0.1:port`` (0: a free port; ``server.server_address[1]`` tells which);
    ``server.store`` is its :class:`LabelStore`. Call ``serve_forever()`` (or run it in a thread)."""
    store = LabelStore(folder, labels)
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(store))
    server.daemon_threads = True
    server.store = store
    return server


def serve(folder: str | os.PathLike, port: int = DEFAULT_PORT, labels: str | os.PathLike | None = None) -> None:
    """Serve the labelling page until Ctrl-C (``flowalign label FOLDER``)."""
    server = make_server(folder, port, labels)
    store = server.store
    if store.recovered:
        print(store.recovered)
    total, done = len(store.manifest["prompts"]), len(store.labels)
    print(f"Labelling {total} prompts x {store.n} images ({done} labelled) at "
          f"http://127.0.0.1:{server.server_address[1]}/ ; labels are appended to {store.path}. Ctrl-C stops.")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"\nStopped; {len(store.labels)} of {total} prompts labelled in {store.path}.")
    finally:
        server.server_close()
