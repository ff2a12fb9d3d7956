"""The promotion gate: re-evaluate the candidate and the champion on the same held-out data now,
move `champion` only when the candidate wins by the margin with no class under the floor, and
record the decision. Aliases only (stages are deprecated): `champion` is what services load,
`previous-champion` the version it replaced. Alias writes are last-writer-wins, so promotions and
rollbacks of one model are serialised by `pipeline.registry.lease.PromotionLock`."""

from __future__ import annotations

import json
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.config import StorageConfig
from pipeline.errors import RegistryError
from pipeline.registry.card import write_model_card
from pipeline.registry.lease import LockSettings, PromotionLock
from pipeline.registry.versions import (
    aliases_of,
    download_version,
    mlflow_errors,
    resolve_version,
)
from pipeline.tags import (
    CHAMPION,
    COMPARISON_DIR,
    DECISION_PREFIX,
    MODEL_META_FILE,
    PREVIOUS_CHAMPION,
    ROLLED_BACK_TAG,
)

_EPS = 1e-9  # accuracies are ratios of counts: differences below this are float noise


@dataclass
class Evaluation:
    """A version's scores on the held-out data, recomputed by `evaluation.evaluate_model`."""

    version: str
    acc: float
    loss: float
    count: int
    per_class: dict[str, float]


@dataclass
class PromotionDecision:
    name: str
    candidate: Evaluation
    champion: Evaluation | None
    promote: bool
    reason: str
    data_uri: str
    split: str
    data_digest: str
    min_improvement: float
    class_floor: float
    dry_run: bool = False
    acted: bool = False  # the aliases were moved (never on a dry run)
    decided_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def outcome(self) -> str:
        if not self.promote:
            return "refused"
        return "would promote" if self.dry_run else "promoted"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "outcome": self.outcome}

    def to_markdown(self) -> str:
        champ = self.champion
        rows = [
            "| | candidate | champion |",
            "|---|---|---|",
            f"| version | {self.candidate.version} | {champ.version if champ else '-'} |",
            f"| accuracy | {self.candidate.acc:.4f} | {f'{champ.acc:.4f}' if champ else '-'} |",
            f"| loss | {self.candidate.loss:.4f} | {f'{champ.loss:.4f}' if champ else '-'} |",
        ]
        for cls, acc in self.candidate.per_class.items():
            other = f"{champ.per_class.get(cls, float('nan')):.4f}" if champ else "-"
            rows.append(f"| class {cls} | {acc:.4f} | {other} |")
        return "\n".join(
            [
                f"# Promotion of {self.name} version {self.candidate.version}: {self.outcome}",
                "",
                f"{self.reason}",
                "",
                f"Data: {self.data_uri} [{self.split}], digest {self.data_digest[:16]}; "
                f"margin {self.min_improvement:g}, class floor {self.class_floor:g}; "
                f"{self.decided_at}",
                "",
                *rows,
                "",
            ]
        )


def decide(
    candidate: Evaluation,
    champion: Evaluation | None,
    min_improvement: float,
    class_floor: float,
) -> tuple[bool, str]:
    """(promote?, reason). The candidate must be strictly better than the champion by at least
    `min_improvement` (so equal scores never churn the alias), and no class may be under
    `class_floor`; the floor also applies to the first version."""
    low = {c: a for c, a in candidate.per_class.items() if a + _EPS < class_floor}
    if low:
        listed = ", ".join(f"{c!r} {a:.4f}" for c, a in sorted(low.items()))
        return False, f"class accuracy below the floor {class_floor:g}: {listed}"
    if champion is None:
        return True, f"no champion yet: version {candidate.version} becomes the first"
    if candidate.version == champion.version:
        return False, f"version {candidate.version} is already the champion"
    delta = candidate.acc - champion.acc
    scores = (
        f"accuracy {candidate.acc:.4f} vs champion v{champion.version} {champion.acc:.4f} "
        f"({delta:+.4f})"
    )
    if delta <= _EPS:
        return False, f"not better than the champion: {scores}"
    if delta + _EPS < min_improvement:
        return False, f"better by less than the margin {min_improvement:g}: {scores}"
    return True, f"better by at least the margin {min_improvement:g}: {scores}"


def _evaluate(
    model_dir: Path, version: str, data_uri: str, split: str, storage, verify: bool = True
) -> Evaluation:
    from pipeline.evaluation import evaluate_model

    result = evaluate_model(str(model_dir), data_uri, split, storage, verify=verify)
    rows = [sum(row) for row in result["confusion"]]
    return Evaluation(
        version=version,
        acc=float(result["acc"]),
        loss=float(result["loss"]),
        count=int(result["count"]),
        # A class with no held-out rows has no accuracy to judge: it is left out, so that
        # `class_floor` does not refuse every candidate for a class the split lacks.
        per_class={
            k: float(v)
            for (k, v), n in zip(result["per_class_accuracy"].items(), rows, strict=True)
            if n > 0
        },
    )


def _dataset_uri(model_dir: Path, name: str, version: str) -> str:
    from pipeline.model_package import _find

    meta = json.loads(_find(model_dir, MODEL_META_FILE).read_text())
    uri = (meta.get("dataset") or {}).get("uri")
    if not uri:
        raise RegistryError(
            f"models:/{name}/{version}: its {MODEL_META_FILE} records no dataset URI; pass --data"
        )
    return uri


class _Evaluator:
    """Evaluates versions on one dataset split, each at most once (versions are immutable)."""

    def __init__(self, client, name: str, data_uri: str | None, split: str, storage, tmp: Path):
        self.client, self.name, self.tmp = client, name, tmp
        self.data_uri, self.split, self.storage = data_uri, split, storage
        self._done: dict[str, Evaluation] = {}

    def __call__(self, version: str) -> Evaluation:
        if version not in self._done:
            local = download_version(self.client, self.name, version, self.tmp / f"v{version}")
            if self.data_uri is None:  # the candidate (evaluated first) names the data
                self.data_uri = _dataset_uri(local, self.name, version)
            verify = not self._done  # one split, read and hashed once for both models
            self._done[version] = _evaluate(
                local, version, self.data_uri, self.split, self.storage, verify
            )
        return self._done[version]


def promote(
    client,
    name: str,
    *,
    candidate: str | None = None,
    data_uri: str | None = None,
    split: str = "test",
    min_improvement: float = 0.0,
    class_floor: float = 0.0,
    dry_run: bool = False,
    storage: StorageConfig | None = None,
    lock: LockSettings | None = None,
) -> PromotionDecision:
    """Move `champion` to `candidate` (default: the newest version) if it beats the champion.

    Both are evaluated now on the same data: `data_uri`, else the dataset the candidate was
    trained on (its pipeline_model.json), split `split`. Outside a dry run the decision is taken
    under `PromotionLock`, with the champion re-read there, and recorded as version tags on the
    candidate and a comparison artifact in its run; a refusal moves no alias.
    """
    from pipeline.data.shards import read_manifest

    cand = resolve_version(client, name, candidate)
    version = str(cand.version)
    if cand.tags.get(ROLLED_BACK_TAG):
        raise RegistryError(
            f"{name} version {version} was rolled back ({cand.tags[ROLLED_BACK_TAG]}); "
            f"delete its tag {ROLLED_BACK_TAG!r} to make it a candidate again"
        )
    with tempfile.TemporaryDirectory(prefix="promote-") as tmp:
        evaluate = _Evaluator(client, name, data_uri, split, storage, Path(tmp))
        cand_eval = evaluate(version)  # outside the lock: a version never changes
        digest = read_manifest(evaluate.data_uri, storage).digest
        champion = aliases_of(client, name).get(CHAMPION)
        if champion is not None and champion != version:
            evaluate(champion)  # usually the champion the lock will find: keep the lock short

        def decision(champion: str | None) -> PromotionDecision:
            champ_eval = evaluate(champion) if champion is not None else None
            ok, reason = decide(cand_eval, champ_eval, min_improvement, class_floor)
            return PromotionDecision(
                name=name,
                candidate=cand_eval,
                champion=champ_eval,
                promote=ok,
                reason=reason,
                data_uri=evaluate.data_uri,
                split=split,
                data_digest=digest,
                min_improvement=min_improvement,
                class_floor=class_floor,
                dry_run=dry_run,
            )

        if dry_run:
            return decision(champion)
        with PromotionLock(client, name, lock or LockSettings()) as held:
            # Another promotion may have moved the champion since we looked: decide again.
            result = decision(aliases_of(client, name).get(CHAMPION))
            if result.promote:
                held.ensure_held()
                _move_champion(client, name, version, result.champion)
                result.acted = True
            if result.champion is None or result.champion.version != version:
                _record(
                    client, version, cand.run_id, result
                )  # (re-promoting the champion records nothing)
    return result


def _move_champion(client, name: str, version: str, old: Evaluation | None) -> None:
    with mlflow_errors(f"registered model {name!r}"):
        if old is not None:  # previous-champion first: `champion` is never left without history
            client.set_registered_model_alias(name, PREVIOUS_CHAMPION, old.version)
        client.set_registered_model_alias(name, CHAMPION, version)
        now = aliases_of(client, name).get(CHAMPION)
    if now != version:
        raise RegistryError(
            f"registered model {name!r}: champion is v{now} right after setting it to v{version}; "
            "something moves aliases without `pipeline promote` (it ignores the promotion lock)"
        )


def _record(client, version: str, run_id: str | None, decision: PromotionDecision) -> None:
    """Version tags for the decision, and the comparison as JSON + Markdown in the run."""
    champ = decision.champion
    tags = {
        "decision": decision.outcome,
        "reason": decision.reason[:4000],
        "candidate_acc": f"{decision.candidate.acc:.6f}",
        "champion_acc": f"{champ.acc:.6f}" if champ else "",
        "champion_version": champ.version if champ else "",
        "data_uri": decision.data_uri,
        "data_digest": decision.data_digest,
        "split": decision.split,
        "decided_at": decision.decided_at,
    }
    stamp = decision.decided_at.replace(":", "").replace("+0000", "Z") + "-" + uuid.uuid4().hex[:6]
    with mlflow_errors(f"models:/{decision.name}/{version}"):
        for key, value in tags.items():
            client.set_model_version_tag(decision.name, version, DECISION_PREFIX + key, value)
        if run_id:
            base = f"{COMPARISON_DIR}/{stamp}-v{version}"
            client.log_dict(run_id, decision.to_dict(), f"{base}.json")
            client.log_text(run_id, decision.to_markdown(), f"{base}.md")
        write_model_card(client, decision.name, version)  # the card now tells the decision


def rollback(client, name: str, lock: LockSettings | None = None) -> tuple[str, str]:
    """Move `champion` back to `previous-champion`; returns (from_version, to_version).

    The replaced version is tagged `pipeline.rolled_back`, so a nightly `promote` does not put it
    straight back; `previous-champion` is removed (there is no older history to point at).
    """
    with PromotionLock(client, name, lock or LockSettings()) as held:
        aliases = aliases_of(client, name)
        previous, current = aliases.get(PREVIOUS_CHAMPION), aliases.get(CHAMPION)
        if previous is None:
            raise RegistryError(
                f"registered model {name!r} has no {PREVIOUS_CHAMPION!r} alias to roll back to "
                f"(champion: {f'v{current}' if current else 'none'})"
            )
        held.ensure_held()
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        with mlflow_errors(f"registered model {name!r}"):
            client.set_registered_model_alias(name, CHAMPION, previous)
            client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
            if current is not None and current != previous:
                client.set_model_version_tag(
                    name, current, ROLLED_BACK_TAG, f"{stamp}: champion returned to v{previous}"
                )
    return current or "", previous
