"""A deterministic world of made-up facts, so `locft demo` and the tests need no downloads.

Subjects are invented two-word names ("Vorin Talbeck"); every subject has one object per relation, drawn
from that relation's pool. Each relation has several paraphrase templates: template 0 is the edit prompt,
the others are the rephrasings used to measure generalization. Because every name is invented, a model
can only know a fact if it was pretrained on it, and an edit can only be right if the editor wrote it.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from locft_dist.edits.schema import EditRequest, LocalityProbe

WORLD_FORMAT = "locft-demo-world/1"


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) triple; the object is the answer after any template's prompt."""

    subject: str
    relation: str
    object: str


@dataclass(frozen=True)
class Relation:
    """A relation with its pool of possible objects and its paraphrase templates ("{s}" = subject)."""

    name: str
    objects: tuple[str, ...]
    templates: tuple[str, ...]


# Templates end right before the object (no trailing space): the answer is always " " + object, so the
# answer's tokens are the same whether it is tokenized alone or inside the sentence.
RELATIONS: tuple[Relation, ...] = (
    Relation(
        name="home_city",
        objects=(
            "Port Veldra", "Ossara", "Brennholt", "Calimor", "Duskfall", "Eskarth", "Faronne", "Glimmerby",
            "Halvask", "Istrelle", "Jorvane", "Kestermoor", "Lunaris", "Marrowgate", "Nerith", "Olvenport",
            "Pellacre", "Quorra", "Ravensclo", "Sundrel", "Tallowmere", "Umberlin", "Vasko", "Wyndhollow",
            "Xantis", "Yarrowfield", "Zelmar", "New Ardent", "Saint Corvel", "Lower Mirrow",
        ),
        templates=(
            "{s} lives in the city of",
            "The home city of {s} is",
            "{s} resides in",
            "{s} has a house in",
        ),
    ),
    Relation(
        name="profession",
        objects=(
            "baker", "carpenter", "astronomer", "glassblower", "cartographer", "beekeeper", "locksmith",
            "lighthouse keeper", "tailor", "blacksmith", "botanist", "clockmaker", "fisher", "potter",
            "stonemason", "bookbinder", "chemist", "shipwright", "weaver", "falconer", "brewer", "surveyor",
            "archivist", "perfumer", "ferryman",
        ),
        templates=(
            "{s} works as a",
            "The profession of {s} is",
            "By trade, {s} is a",
            "{s} earns a living as a",
        ),
    ),
    Relation(
        name="instrument",
        objects=(
            "cello", "oboe", "harp", "bassoon", "lute", "viola", "trumpet", "marimba", "bagpipes", "zither",
            "accordion", "flute", "tuba", "banjo", "harpsichord", "bass clarinet", "french horn", "sitar",
            "mandolin", "glockenspiel", "piccolo", "theremin", "dulcimer", "ocarina",
        ),
        templates=(
            "{s} plays the",
            "The favourite instrument of {s} is the",
            "{s} is best known for playing the",
            "The instrument that {s} plays is the",
        ),
    ),
    Relation(
        name="employer",
        objects=(
            "Kestrel Dynamics", "Aldmoor Mills", "Brightwater Trading", "Corvane Shipping", "Dunmere Bank",
            "Elderglen Press", "Fenwick Foundry", "Graystone Mining", "Hollowbrook Dairy", "Ironvale Rail",
            "Juniper Labs", "Kingsreach Textiles", "Larkspur Optics", "Morrow Insurance", "Northwind Ferries",
            "Oakhaven Timber", "Pinecrest Glassworks", "Quillon Archives", "Redfern Brewery",
            "Silverfen Observatory", "Thistledown Farms", "Umbra Clockworks", "Valewood Pottery",
            "Westmarch Salt",
        ),
        templates=(
            "{s} is employed by",
            "The employer of {s} is",
            "{s} works for",
            "{s} draws a salary from",
        ),
    ),
)  # fmt: skip

_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s", "t", "th",
           "v", "w", "z", "j", "st", "tr")  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "th", "m", "ck", "nd", "rn", "x")


def _word(rng: random.Random, num_syllables: int) -> str:
    """A pronounceable made-up word: onset-vowel-coda syllables, capitalized."""
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(num_syllables)]
    return "".join(parts).capitalize()


def _make_names(rng: random.Random, num: int) -> list[str]:
    """``num`` unique "First Last" names; first names have 2 syllables, surnames 2-3."""
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < num:
        name = f"{_word(rng, 2)} {_word(rng, rng.choice((2, 3)))}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


@dataclass
class World:
    """The facts of a synthetic world plus the relations (object pools, templates) they use."""

    facts: list[Fact]
    relations: list[Relation]
    seed: int
    num_subjects: int
    _by_name: dict[str, Relation] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name = {r.name: r for r in self.relations}

    @property
    def subjects(self) -> list[str]:
        """Subjects in first-appearance order."""
        return list(dict.fromkeys(f.subject for f in self.facts))

    def relation(self, name: str) -> Relation:
        return self._by_name[name]

    def num_templates(self, fact: Fact) -> int:
        return len(self._by_name[fact.relation].templates)

    def prompt(self, fact: Fact, template_index: int = 0) -> str:
        """The prompt whose continuation is " " + object (template 0 is the edit prompt)."""
        return self._by_name[fact.relation].templates[template_index].format(s=fact.subject)

    def sentence(self, fact: Fact, template_index: int = 0) -> str:
        """The full statement of the fact: prompt + " " + object."""
        return f"{self.prompt(fact, template_index)} {fact.object}"

    def pretraining_corpus(self) -> list[str]:
        """Every fact under every template of its relation, in a fixed order."""
        return [self.sentence(f, t) for f in self.facts for t in range(self.num_templates(f))]

    def make_edits(self, num_edits: int, seed: int, num_locality: int = 2) -> list[EditRequest]:
        """Counterfactual edits of ``num_edits`` facts of distinct subjects.

        Each edit moves its fact to a different object of the same relation; rephrasings are the other
        templates; locality probes are true facts (template 0) of subjects that no edit touches, so a
        perfect editor leaves them unchanged. Deterministic for (world, seed).
        """
        subjects = self.subjects
        if num_edits < 0 or num_locality < 0:
            raise ValueError("num_edits and num_locality must be >= 0")
        if num_edits >= len(subjects):
            raise ValueError(
                f"num_edits={num_edits} needs more subjects than the world has ({len(subjects)}): each edit "
                "takes a distinct subject and locality probes need subjects left untouched"
            )
        rng = random.Random(seed)
        edited = rng.sample(subjects, num_edits)
        edited_set = set(edited)
        by_subject: dict[str, list[Fact]] = {}
        for fact in self.facts:
            by_subject.setdefault(fact.subject, []).append(fact)
        probe_pool = [f for f in self.facts if f.subject not in edited_set]
        if num_locality > len(probe_pool):
            raise ValueError(f"num_locality={num_locality} exceeds the {len(probe_pool)} untouched facts")
        requests = []
        for subject in edited:
            fact = rng.choice(by_subject[subject])
            pool = [o for o in self._by_name[fact.relation].objects if o != fact.object]
            probes = rng.sample(probe_pool, num_locality)
            requests.append(
                EditRequest(
                    prompt=self.prompt(fact, 0),
                    target_new=rng.choice(pool),
                    subject=subject,
                    target_true=fact.object,
                    rephrase_prompts=tuple(self.prompt(fact, t) for t in range(1, self.num_templates(fact))),
                    locality_prompts=tuple(LocalityProbe(self.prompt(p, 0), p.object) for p in probes),
                )
            )
        return requests

    def edited_facts(self, requests: list[EditRequest]) -> set[Fact]:
        """The facts of this world that ``requests`` change (matched by subject and prompt)."""
        wanted = {(r.subject, r.prompt) for r in requests}
        return {f for f in self.facts if (f.subject, self.prompt(f, 0)) in wanted}

    def neighbour_prompts(self, requests: list[EditRequest]) -> list[str]:
        """Edit prompts (template 0) of the edited subjects' other, unedited facts.

        The nearest facts an edit can disturb, and disjoint from ``make_edits``' locality probes (which
        ask about subjects no edit touches): training on them leaves the locality metric held out.
        """
        edited = self.edited_facts(requests)
        subjects = {r.subject for r in requests}
        return [self.prompt(f, 0) for f in self.facts if f.subject in subjects and f not in edited]

    def heldout_texts(self, n: int, seed: int, exclude: list[EditRequest] | None = None) -> list[str]:
        """``n`` true sentences (random templates) of facts not in ``exclude``, for a perplexity check.

        The model was pretrained on them, so their perplexity measures collateral damage of editing.
        """
        skip = self.edited_facts(exclude or [])
        candidates = [f for f in self.facts if f not in skip]
        rng = random.Random(seed)
        chosen = rng.sample(candidates, min(n, len(candidates)))
        return [self.sentence(f, rng.randrange(self.num_templates(f))) for f in chosen]

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable dict; ``World.from_json`` rebuilds an equal world."""
        return {
            "format": WORLD_FORMAT,
            "seed": self.seed,
            "num_subjects": self.num_subjects,
            "relations": [
                {"name": r.name, "objects": list(r.objects), "templates": list(r.templates)}
                for r in self.relations
            ],
            "facts": [asdict(f) for f in self.facts],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> World:
        if data.get("format") != WORLD_FORMAT:
            raise ValueError(f"not a demo world (format={data.get('format')!r}, expected {WORLD_FORMAT!r})")
        relations = [
            Relation(r["name"], tuple(r["objects"]), tuple(r["templates"])) for r in data["relations"]
        ]
        facts = [Fact(**f) for f in data["facts"]]
        return cls(facts=facts, relations=relations, seed=data["seed"], num_subjects=data["num_subjects"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n", "utf-8")

    @classmethod
    def load(cls, path: str | Path) -> World:
        return cls.from_json(json.loads(Path(path).read_text("utf-8")))


def build_world(
    *,
    num_subjects: int,
    seed: int,
    num_relations: int | None = None,
    objects_per_relation: int | None = None,
) -> World:
    """A world of ``num_subjects`` invented subjects, each with one object for every relation.

    ``num_relations`` and ``objects_per_relation`` shrink the built-in relation set and object pools
    (smaller pools make a world easier to memorize); ``None`` keeps them all.
    """
    if num_subjects < 2:
        raise ValueError("num_subjects must be >= 2")
    relations = list(RELATIONS[: num_relations or len(RELATIONS)])
    if objects_per_relation is not None:
        if objects_per_relation < 2:
            raise ValueError("objects_per_relation must be >= 2 (an edit needs a different object)")
        relations = [Relation(r.name, r.objects[:objects_per_relation], r.templates) for r in relations]
    rng = random.Random(seed)
    names = _make_names(rng, num_subjects)
    facts = [Fact(name, r.name, rng.choice(r.objects)) for name in names for r in relations]
    return World(facts=facts, relations=relations, seed=seed, num_subjects=num_subjects)
