import itertools
import json
import os
import random
import re

import pytest

import story_corpus
from configurator import UserError
from story_corpus import (BOYS, FEATURES, GIRLS, PET_NAMES, SHAPES, fits, make_story, tell, write_corpus,
                          write_shard)

SAD = {"sad", "cried", "tears"}
HAPPY = {"happy", "smiled", "smile", "smiles", "laughed", "giggled", "glad", "best", "fun", "proud", "hug", "hugged",
         "joy", "warm"}
MORAL = {"learned", "lesson", "moral"}
TWIST = ("surprise", "turned out", "all along")
QUARREL = {"argue", "argued", "fight", "fought", "angry", "mad"}
# words too common to tie an early hint to its payoff
COMMON = {"remembered", "then", "that", "what", "said", "when", "with", "they", "their", "about", "have", "been",
          "this", "were", "there", "grandma", "grandpa", "always", "told", "would", "very", "little"}
NAMES = {name.lower() for name in GIRLS + BOYS + PET_NAMES}


def words(text):
    return re.findall(r"[a-z]+", text.lower())


def sentences(paragraph):
    return re.split(r'(?<=[.!?])\s+(?=["A-Z])|(?<=[.!?]")\s+(?=["A-Z])', paragraph)


def problems(record):
    """What is wrong with a record: schema, words, features, length, grammar slips. Empty when all is well."""
    found = []
    assert set(record) == {"story", "instruction", "summary", "source"} and record["source"] == "builtin"
    instruction, story = record["instruction"], record["story"]
    assert set(instruction) == {"prompt:", "words", "features"}
    features, paragraphs = instruction["features"], story.split("\n")
    if features != [f for f in FEATURES if f in features]:
        found.append(f"features not a subset of {FEATURES} in that order: {features}")
    used, last = set(words(story)), set(words(paragraphs[-1]))

    verb, noun, adjective = instruction["words"]
    for word in (verb, noun, adjective):
        if not re.search(rf"\b{word}\b", story):
            found.append(f"{word!r} not in the story")
    if not 80 <= len(story.split()) <= 300:
        found.append(f"{len(story.split())} words")
    if not 3 <= len(paragraphs) <= 5:
        found.append(f"{len(paragraphs)} paragraphs")

    evidence = {
        "Dialogue": re.search(r'"[A-Z][^"]*[.!?,]"', story) is not None,
        "BadEnding": bool(last & SAD),
        "MoralValue": bool(used & MORAL),
        "Twist": any(cue in story.lower() for cue in TWIST),
        "Foreshadowing": "remembered" in used,
        "Conflict": bool(used & QUARREL),
    }
    for feature, seen in evidence.items():
        if seen != (feature in features):
            found.append(f"{feature}: in features {feature in features}, evidence {seen}")
    if '"' in story and "Dialogue" not in features:
        found.append("quotes without Dialogue")
    if "BadEnding" not in features and not last & HAPPY:
        found.append("a good ending without a happy word")
    if "Foreshadowing" in features:
        payoff = [x for p in paragraphs[1:] for x in sentences(p) if "remembered" in x]
        content = lambda text: {w[:4] for w in words(text) if len(w) >= 4 and w not in COMMON | NAMES | {noun}}
        link = content(" ".join(payoff)) & content(paragraphs[0])
        if "remembered" in paragraphs[0] or not link:
            found.append("no early hint that the payoff remembers")
    if "MoralValue" in features and not any(used & MORAL for used in map(set, map(words, sentences(paragraphs[-1])))):
        found.append("the moral is not in the last paragraph")

    # a/an, unfilled slots, stray spaces, a word twice, a sentence or paragraph starting in lower case
    for slip in (r"\ba [aeio]", r"\ban [^aeiou\s]", r"[{}]", r"  ", r" [,.!?]", r"\.\.", r"\b(\w+) \1\b",
                 r"[.!?] [a-z]", r'(^|\n)"?[a-z]'):
        match = re.search(slip, story + "\n" + record["summary"])
        if match:
            found.append(f"slip {match.group(0)!r}")

    summary = record["summary"]
    if not (summary.endswith(".") and summary[0].isupper() and not re.search(r"[.!?] ", summary[:-1])):
        found.append(f"summary is not one sentence: {summary!r}")
    if not {w for w in re.findall(r"[A-Z][a-z]+", summary) if w.lower() in NAMES} <= set(re.findall(r"[A-Z][a-z]+",
                                                                                                 story)):
        found.append(f"summary names someone not in the story: {summary!r}")
    return found


@pytest.fixture(scope="module")
def sample():
    rng = random.Random(1234)
    return [make_story(rng) for _ in range(3000)]


def test_records_have_the_schema_words_features_and_length(sample):
    bad = [(p, r["story"]) for r in sample for p in problems(r)]
    assert not bad, bad[:3]


def test_every_shape_with_every_feature_mix():
    mixes = [[f for f, on in zip(FEATURES, bits) if on] for bits in itertools.product((0, 1), repeat=6)]
    rng = random.Random(7)
    checked = 0
    for shape in SHAPES:
        for features in mixes:
            if fits(shape, features):
                for _ in range(3):
                    record = tell(rng, shape, features)
                    assert not problems(record), (shape, problems(record), record["story"])
                    checked += 1
    assert checked > 9 * 3 * 16


def test_prompt_is_tinystories_wording():
    rng = random.Random(0)
    record = tell(rng, "lost", ["Dialogue", "BadEnding"])
    verb, noun, adjective = record["instruction"]["words"]
    assert record["instruction"]["prompt:"] == (
        "Write a short story (3-5 paragraphs) which only uses very simple words that a 3 year old child would "
        f'understand. The story should use the verb "{verb}", the noun "{noun}" and the adjective "{adjective}". '
        "The story has the following features: the story should contain at least one dialogue, the story has a "
        "bad ending. Remember to only use simple words!\n\nPossible story:")
    plain = tell(rng, "stuck", [])["instruction"]["prompt:"]
    assert "features" not in plain and plain.endswith('". Remember to only use simple words!\n\nPossible story:')
    assert "the narrative uses foreshadowing or setup and payoff" in tell(rng, "warning", ["Foreshadowing"])[
        "instruction"]["prompt:"]


def test_feature_mix_is_like_tinystories(sample):
    share = {f: sum(f in r["instruction"]["features"] for r in sample) / len(sample) for f in FEATURES}
    for feature, chance in story_corpus.FEATURE_CHANCE.items():
        assert abs(share[feature] - chance) < 0.04, (feature, share[feature])
    assert 0.1 < sum(not r["instruction"]["features"] for r in sample) / len(sample) < 0.3
    shapes_seen = {r["summary"] for r in sample}
    assert len(shapes_seen) > 2500  # summaries follow their stories, so they differ


def test_vocabulary_and_variety(sample):
    vocabulary = {w for r in sample for w in words(r["story"])}
    assert 600 <= len(vocabulary) <= 3000
    for kind, index in (("verb", 0), ("noun", 1), ("adjective", 2)):
        assert len({r["instruction"]["words"][index] for r in sample}) >= 40, kind
    openings = {" ".join(r["story"].split()[:4]) for r in sample}
    assert len(openings) > 100
    assert len({r["story"] for r in sample}) == len(sample)


def test_deterministic_and_shards_differ(tmp_path):
    a = write_corpus(tmp_path / "a", num_shards=3, stories_per_shard=40, seed=5, progress=False)
    b = write_corpus(tmp_path / "b", num_shards=3, stories_per_shard=40, seed=5, progress=False)
    c = write_corpus(tmp_path / "c", num_shards=3, stories_per_shard=40, seed=6, progress=False)
    assert [os.path.basename(p) for p in a] == ["data00.json", "data01.json", "data02.json"]
    blobs = [open(p, "rb").read() for p in a]
    assert blobs == [open(p, "rb").read() for p in b]
    assert all(x != y for x, y in zip(blobs, (open(p, "rb").read() for p in c)))
    assert len(set(blobs)) == 3
    for blob in blobs:
        records = json.loads(blob)
        assert isinstance(records, list) and len(records) == 40 and not any(problems(r) for r in records)
    assert sorted(os.listdir(tmp_path / "a")) == ["data00.json", "data01.json", "data02.json"]
    # one process or a pool: the same bytes
    one = write_shard(str(tmp_path / "c"), 1, 40, 5)
    assert open(one, "rb").read() == blobs[1]


def test_a_failed_shard_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "data00.json"
    path.write_text("[]")
    real, made = story_corpus.make_story, []

    def failing(rng):
        if len(made) == 5:
            raise KeyboardInterrupt
        made.append(1)
        return real(rng)
    monkeypatch.setattr(story_corpus, "make_story", failing)
    with pytest.raises(KeyboardInterrupt):
        write_shard(str(tmp_path), 0, 10, 0)
    assert path.read_text() == "[]" and os.listdir(tmp_path) == ["data00.json"]


def test_bad_arguments_and_preview(capsys):
    with pytest.raises(UserError, match="num_shards"):
        write_corpus("unused", num_shards=0, progress=False)
    with pytest.raises(UserError, match="is a file"):
        write_corpus(__file__, num_shards=1, stories_per_shard=1, progress=False)
    story_corpus.main(["--num_stories=1", "--seed=3"])
    out = capsys.readouterr().out
    assert "Possible story:" in out and "Summary: " in out
    with pytest.raises(SystemExit) as e:
        story_corpus.main(["--num_stories=two"])
    assert e.value.code == 2


def test_the_checker_catches_wrong_records():
    record = tell(random.Random(3), "broken", ["Dialogue", "Conflict"])
    assert not problems(record)
    for change in (lambda r: r["instruction"]["features"].remove("Dialogue"),
                   lambda r: r["instruction"]["features"].insert(1, "Twist"),
                   lambda r: r["instruction"]["words"].__setitem__(0, "swim"),
                   lambda r: r.__setitem__("story", r["story"].replace(" a ", " an ", 1)),
                   lambda r: r.__setitem__("story", r["story"].rsplit("\n", 1)[0])):
        wrong = json.loads(json.dumps(record))
        change(wrong)
        assert problems(wrong), wrong
