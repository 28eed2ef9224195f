"""Stage 2: selective-search proposals, per image, in parallel workers.

Reads: the split's images. Writes: ``<run>/proposals/<split>/<id>.npz`` ((R, 4) xyxy boxes in the image's
pixels) and a manifest with each image's file hash (a changed image rebuilds only its own shard).
"""

from __future__ import annotations

from ..proposals import RECORDED_SINCE, compute_proposals, resolved_params
from ..run import Run
from .common import StageSpec


def stage_proposals(run: Run, split: str, overwrite: bool = False, workers: int | None = None) -> dict:
    """Proposals of every image of ``split`` (``workers``: processes; default ``proposals.workers``)."""
    p = run.cfg.proposals
    ds = run.dataset(split)
    return compute_proposals(ds.ids, ds.image_path, run.proposals_dir(split), p.backend, p.max_boxes, p.min_size,
                             p.params, p.precomputed and str(run.path(p.precomputed)), p.workers if workers is None else workers, overwrite,
                             image_size=lambda i: (ds.annotation(i).height, ds.annotation(i).width),
                             annotation_path=ds.annotation_path,
                             inputs={"images": run.content(split, "images")},
                             item_inputs=run.item_hashes(split, "images"), cap_nms=p.cap_nms)



def proposal_settings(run: Run) -> dict:
    """The settings a proposal folder records (the backend's parameters resolved to its defaults): what the
    features stage checks the folder it reads against."""
    p = run.cfg.proposals
    return {"backend": p.backend, "max_boxes": p.max_boxes, "min_size": p.min_size, "cap_nms": float(p.cap_nms),
            "params": resolved_params(p.backend, dict(p.params)),
            "precomputed": p.precomputed and str(run.path(p.precomputed))}



def require_proposals(run: Run, split: str) -> dict:
    """The split's finished proposal folder's manifest, refused by name when made with other proposal settings."""
    from .common import require_settings

    return require_settings(run, run.proposals_dir(split), f"tools/propose.py --split {split}", {},
                            proposal_settings(run), prefix="proposals.", extra_defaults=RECORDED_SINCE)


SPEC = StageSpec("proposals", "tools/propose.py", True, ("data: the split's images",),
                 "proposals/<split>/", ("proposals",), stage_proposals)
