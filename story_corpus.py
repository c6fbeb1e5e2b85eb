"""The built-in story corpus: simple children's stories in the TinyStories layout, written offline from a seed.

    python story_corpus.py --num_stories=3 --seed=1     # print a few stories with their instructions

`python tinystories.py builtin` calls write_corpus(). Each record has the fields of a TinyStories record:
{"story", "instruction": {"prompt:", "words": [verb, noun, adjective], "features"}, "summary", "source"}.
A story is a small plot (someone, a place, a thing, a problem, help, an ending) told with hand-written
sentence variants. The instruction's three words are picked among the words the story really uses, and each
feature is written into the story: quoted speech, a sad last paragraph, a moral, a surprise, an early hint
that is "remembered" later, a quarrel.
"""
import functools
import itertools
import json
import os
import random
import re

from tqdm import tqdm

from configurator import UserError, atomic_output, cli, configure, map_in_processes

# -----------------------------------------------------------------------------
# settings for `python story_corpus.py` (a preview; tinystories.py writes the corpus)
num_stories = 2
seed = 0
# -----------------------------------------------------------------------------

SOURCE = "builtin"
FEATURES = ("Dialogue", "BadEnding", "MoralValue", "Twist", "Foreshadowing", "Conflict")
# how TinyStories' prompts phrase each feature
FEATURE_TEXT = {
    "Dialogue": "the story should contain at least one dialogue",
    "BadEnding": "the story has a bad ending",
    "MoralValue": "the story has a moral value",
    "Twist": "something unexpected happens / there is a plot twist",
    "Foreshadowing": "the narrative uses foreshadowing or setup and payoff",
    "Conflict": "the story has some form of conflict in it",
}
# each feature is drawn on its own; these are our estimates of TinyStories' mix (most stories end well)
FEATURE_CHANCE = {"Dialogue": 0.5, "BadEnding": 0.1, "MoralValue": 0.3, "Twist": 0.2, "Foreshadowing": 0.15,
                  "Conflict": 0.2}
MIN_WORDS, MAX_WORDS = 80, 300

# -----------------------------------------------------------------------------
# the words

GIRLS = tuple("Lily Sue Mia Anna Lucy Emma Zoe Ella Rosa Amy Kate Ruby Molly Sara Jane Daisy Lola Ivy Nina May "
              "Bella Grace Sophie Chloe Jill Pam Rita Tina".split())
BOYS = tuple("Tom Ben Tim Max Sam Jack Leo Finn Jake Noah Dan Ollie Bob Joe Luke Adam Eli Ned Ray Billy Milo Theo "
             "Kevin Pete Carl Hugo Oscar Timmy".split())
PET_NAMES = tuple("Spot Buddy Fluffy Coco Pip Rex Whiskers Patch Hoppy Nibbles Rosie Peanut Ginger Snowy Dotty "
                  "Benny Toby Momo Lulu Ziggy Sparky Pepper Goldie Fuzzy Bingo".split())
# animals that can be the hero or the friend, and where such an animal lives
ANIMALS = {
    "bunny": "in a cozy hole under an old tree", "mouse": "in a little hole in the wall of a big house",
    "fox": "in a den at the edge of the forest", "bear": "in a warm cave in the forest",
    "bird": "in a nest high up in a tree", "owl": "in an old tree in the forest",
    "squirrel": "in a tall tree full of nuts", "duck": "by a quiet pond", "frog": "by a little pond",
    "turtle": "by a slow river", "pig": "on a big farm", "cow": "on a big farm", "horse": "on a green farm",
    "lamb": "on a farm by a hill", "goat": "on a farm by a hill", "dog": "in a little house with a red door",
    "cat": "in a warm house with a big garden", "puppy": "in a little house with a big yard",
    "kitten": "in a cozy house in a small town", "monkey": "in a big green jungle",
    "elephant": "in a big green jungle", "lion": "in a hot, wide land", "giraffe": "in a hot, wide land",
    "dinosaur": "in a land of tall trees", "dragon": "in a cave on a big hill",
}
ANIMAL_KINDS = tuple(ANIMALS)
PETS = ("dog", "puppy", "cat", "kitten")
PARENTS = {"mom": "she", "dad": "he", "grandma": "she", "grandpa": "he"}
TRAITS = ("kind brave happy shy curious silly smart gentle friendly cheerful clever helpful polite careful "
          "funny playful quiet busy sweet lazy grumpy messy bossy proud sleepy strong").split()
DAYS = ("sunny", "warm", "bright", "nice", "lovely", "beautiful")

# place: (preposition, adjectives that suit it, things seen there, a high spot where something gets stuck)
PLACES = {
    "park": ("in", "big sunny green busy quiet pretty", ("tall trees", "green grass", "a big slide",
             "ducks on a little pond", "kids on the swings"), "in a tall tree"),
    "garden": ("in", "pretty green sunny little quiet", ("red roses", "tall sunflowers", "busy bees",
               "a little path", "ripe tomatoes"), "on top of the fence"),
    "beach": ("at", "sunny sandy big windy", ("soft sand", "big waves", "pretty shells", "white birds",
              "little crabs"), "on top of a tall rock"),
    "forest": ("in", "big dark quiet green old", ("tall trees", "little birds", "soft moss", "red mushrooms",
               "a small stream"), "on a high branch"),
    "farm": ("on", "big busy old sunny", ("cows and pigs", "a red barn", "little chicks", "tall corn",
             "a muddy pig pen"), "on the roof of the barn"),
    "lake": ("by", "blue quiet big calm", ("little boats", "white ducks", "green frogs", "tall reeds"),
             "in a tree by the water"),
    "pond": ("by", "little quiet muddy calm", ("ducks", "green frogs", "little fish", "tall grass"),
             "on a branch over the water"),
    "hill": ("on", "big green windy tall", ("soft grass", "yellow flowers", "the whole town below"),
             "in a tall tree"),
    "yard": ("in", "big green sunny little", ("a swing", "a tall tree", "green grass", "a little shed"),
             "on the roof of the shed"),
    "playground": ("at", "busy big new fun", ("a big slide", "swings", "a sandbox", "kids running around"),
                   "in a tall tree"),
    "meadow": ("in", "green quiet sunny wide", ("pretty flowers", "butterflies", "tall grass", "buzzing bees"),
               "in a tall tree"),
    "zoo": ("at", "big busy fun", ("big lions", "tall giraffes", "funny monkeys", "a sleepy bear"),
            "on top of a high wall"),
    "river": ("by", "blue long quiet fast", ("little fish", "smooth stones", "a wooden bridge", "a big frog"),
              "on a branch over the water"),
    "field": ("in", "big wide green sunny", ("tall grass", "yellow flowers", "a big tree", "a little rabbit"),
              "in a big tree"),
    "town": ("in", "little busy quiet", ("small shops", "busy streets", "a big clock", "a man selling bread"),
             "on a high roof"),
    "jungle": ("in", "big green hot wild", ("tall trees", "funny monkeys", "big leaves", "bright birds"),
               "on a high branch"),
    "kitchen": ("in", "warm big clean little", ("pots and pans", "a big oven", "a bowl of fruit",
                "a warm loaf of bread"), "on the top shelf"),
}
OUTDOORS = tuple(p for p in PLACES if p != "kitchen")
WATER = ("beach", "lake", "pond", "river")

# activity: base, past, -ing, what is done (base form), where, hard or scary to learn at first
ACTIVITIES = (
    ("play", "played", "playing", ("games", "tag", "hide and seek", "ball"),
     "park yard playground meadow field beach garden", False),
    ("jump", "jumped", "jumping", ("in the puddles", "over the rocks", "up and down", "over the logs"),
     "park yard playground meadow field hill forest", True),
    ("run", "ran", "running", ("fast", "around the trees", "in the grass", "up and down the hill"),
     "park meadow field hill yard", True),
    ("swim", "swam", "swimming", ("in the water", "with the ducks", "like a fish"), "beach lake pond river", True),
    ("dance", "danced", "dancing", ("to happy songs", "in circles", "on tiptoes"),
     "park yard meadow garden kitchen hill", True),
    ("sing", "sang", "singing", ("happy songs", "with the birds", "loud songs"),
     "park yard meadow garden kitchen forest", True),
    ("paint", "painted", "painting", ("pictures of flowers", "the sky and the sun", "pretty pictures"),
     "garden park meadow yard kitchen hill", False),
    ("draw", "drew", "drawing", ("pictures", "funny faces", "big houses and cars"),
     "park yard kitchen garden meadow", False),
    ("read", "read", "reading", ("books", "stories about animals"), "park garden yard kitchen meadow", True),
    ("climb", "climbed", "climbing", ("trees", "up the rocks", "up high"), "park forest yard jungle hill", True),
    ("bake", "baked", "baking", ("cookies", "cakes", "bread"), "kitchen", True),
    ("cook", "cooked", "cooking", ("soup", "yummy food", "eggs"), "kitchen", False),
    ("build", "built", "building", ("sand castles", "a big sand castle"), "beach", True),
    ("build", "built", "building", ("little houses out of sticks", "a fort out of sticks"),
     "yard forest playground park", True),
    ("dig", "dug", "digging", ("in the sand", "in the dirt", "big holes"), "beach garden yard playground", False),
    ("fly", "flew", "flying", ("kites",), "hill beach field park meadow", True),
    ("ride", "rode", "riding", ("a bike", "on the swings"), "park town yard playground", True),
    ("kick", "kicked", "kicking", ("a ball", "a big ball"), "park yard field playground", True),
    ("kick", "kicked", "kicking", ("the leaves", "the fallen leaves"), "park yard field forest", False),
    ("throw", "threw", "throwing", ("sticks", "stones into the water"), "lake pond river beach", True),
    ("catch", "caught", "catching", ("bugs", "butterflies", "falling leaves"), "meadow garden field park", True),
    ("hide", "hid", "hiding", ("behind the trees", "in the tall grass", "under the bushes"),
     "park forest meadow garden yard", False),
    ("skip", "skipped", "skipping", ("down the path", "along the road", "on the grass"),
     "park town meadow field", True),
    ("hop", "hopped", "hopping", ("on one foot", "like a bunny", "from rock to rock"),
     "park yard meadow river field", True),
    ("splash", "splashed", "splashing", ("in the water", "in the waves"), "beach lake pond river", False),
    ("explore", "explored", "exploring", ("new places", "under the big trees"), "forest jungle hill farm beach",
     True),
    ("plant", "planted", "planting", ("seeds", "flowers", "little trees"), "garden yard farm", False),
    ("pick", "picked", "picking", ("flowers", "berries", "apples"), "garden meadow farm forest field", False),
    ("swing", "swung", "swinging", ("on the swings", "high in the air"), "playground park yard", True),
    ("slide", "slid", "sliding", ("down the big slide",), "playground park", True),
    ("fish", "fished", "fishing", ("with a long pole",), "lake pond river", True),
    ("sail", "sailed", "sailing", ("little boats",), "lake pond river", False),
    ("roll", "rolled", "rolling", ("down the hill", "in the grass"), "hill meadow field park", False),
    ("race", "raced", "racing", ("with the other kids", "to the big tree"), "park field meadow playground hill",
     True),
    ("march", "marched", "marching", ("like a soldier", "around the yard"), "yard park town", False),
    ("chase", "chased", "chasing", ("butterflies", "bubbles", "the birds"), "meadow park garden field", False),
    ("blow", "blew", "blowing", ("bubbles",), "park yard garden", False),
    ("watch", "watched", "watching", ("the birds", "the clouds", "the boats"),
     "park hill lake river beach meadow", False),
    ("feed", "fed", "feeding", ("the ducks", "the birds", "the animals"), "pond lake park farm zoo", False),
    ("collect", "collected", "collecting", ("shells", "pretty shells"), "beach", False),
    ("collect", "collected", "collecting", ("pretty stones", "leaves", "acorns"), "forest park river", False),
    ("spin", "spun", "spinning", ("around and around",), "meadow yard park playground", False),
    ("count", "counted", "counting", ("the birds", "the clouds", "the flowers"), "park meadow garden hill", False),
    ("visit", "visited", "visiting", ("the animals",), "zoo farm", False),
    ("whistle", "whistled", "whistling", ("happy songs",), "park garden forest town", False),
)

# thing: what can happen to it (l lost, b breaks, s stuck up high, d spoiled by rain or mud, c can carry a
# small animal) and what it is (t toy, w worn, f food, o other), then adjectives that suit it
THINGS = (
    ("ball", "tlsd", "red blue big round bouncy new shiny yellow green"),
    ("kite", "tsbd", "red blue yellow big colorful new long"),
    ("balloon", "ts", "red blue big pink yellow shiny purple"),
    ("doll", "tlbd", "pretty little old pink soft new"),
    ("teddy", "tld", "soft brown fluffy old little"),
    ("toy car", "tlb", "red fast little shiny blue new"),
    ("toy truck", "tlb", "big red yellow old new"),
    ("toy train", "tlb", "long blue red shiny new"),
    ("toy boat", "tlb", "little red blue white new"),
    ("toy plane", "tlsb", "white red fast new shiny"),
    ("robot", "tlb", "shiny big little new funny"),
    ("drum", "tlb", "loud big red little"),
    ("whistle", "tl", "shiny loud little"),
    ("book", "tld", "big new old fun thick"),
    ("puppet", "tld", "funny soft little"),
    ("crayon", "tlb", "red blue green purple"),
    ("marble", "tl", "shiny blue round"),
    ("bike", "tb", "new red fast blue"),
    ("wagon", "tb", "red little old"),
    ("bucket", "tlbc", "red blue little"),
    ("shovel", "tlb", "little red"),
    ("shell", "olb", "pretty pink white shiny"),
    ("stone", "ol", "smooth shiny round gray"),
    ("feather", "ols", "soft long white blue"),
    ("hat", "wlsdc", "big red new funny warm yellow"),
    ("scarf", "wlsdc", "warm red long soft"),
    ("coat", "wd", "warm new red blue"),
    ("dress", "wd", "pretty pink new yellow"),
    ("crown", "wlb", "shiny golden pretty"),
    ("necklace", "wlb", "pretty shiny"),
    ("bracelet", "wlb", "pretty shiny pink"),
    ("cap", "wls", "red blue new"),
    ("mitten", "wl", "warm red"),
    ("bag", "oldc", "big red new"),
    ("box", "olbdc", "little red big"),
    ("basket", "olbc", "big little"),
    ("cup", "ob", "blue little red pretty"),
    ("bowl", "ob", "big blue"),
    ("blanket", "odc", "soft warm blue"),
    ("key", "ol", "little shiny golden"),
    ("map", "old", "old big"),
    ("umbrella", "olbs", "big yellow red"),
    ("apple", "fl", "red big juicy shiny"),
    ("cookie", "f", "big yummy sweet"),
    ("cake", "f", "big yummy sweet pink"),
    ("sandwich", "f", "big yummy"),
    ("banana", "f", "yellow"),
    ("candy", "f", "sweet pink"),
    ("pie", "f", "warm yummy"),
    ("orange", "f", "juicy big"),
    ("cupcake", "f", "pink sweet little"),
    ("pear", "f", "green juicy"),
    ("carrot", "f", "orange long"),
    ("lollipop", "f", "big red sweet"),
    ("peach", "f", "soft juicy"),
)

def a(phrase):
    """The phrase with its indefinite article: "a ball", "an apple", "an old kite"."""
    return ("an " if phrase[0] in "aeiou" and not phrase.startswith(("uni", "use")) else "a ") + phrase


def cap(text):
    return text[0].upper() + text[1:]


def quote(rng, who, line, verb=None):
    """A line of speech with its speaker, in one of the usual orders: Tom said, "Hi." / "Hi," said Tom."""
    verb = verb or ("asked" if line.endswith("?") else rng.choice(("said", "shouted")) if line.endswith("!")
                    else "said")
    if rng.random() < 0.35:
        return f'{cap(who)} {verb}, "{line}"'
    head = line[:-1] + "," if line.endswith(".") else line
    if who in ("he", "she", "they") or rng.random() < 0.5:
        return f'"{head}" {who} {verb}.'
    return f'"{head}" {verb} {who}.'


class Scene:
    """A story being written: the random source, the words that fill the templates, and the features."""

    def __init__(self, rng, features):
        self.rng, self.features, self.w = rng, features, {}

    def has(self, feature):
        return feature in self.features

    def pick(self, *templates):
        return self.rng.choice(templates).format_map(self.w)

    def pick_set(self, *sets):
        """One of several sets of templates that belong together, all filled in."""
        return [t.format_map(self.w) for t in self.rng.choice(sets)]

    def maybe(self, chance, *templates):
        return self.pick(*templates) if self.rng.random() < chance else ""

    def say(self, who, spoken, told, verb=None):
        """Quoted speech when the story has dialogue, otherwise the narrator tells what was said."""
        if not self.has("Dialogue"):
            return self.pick(*told) if isinstance(told, tuple) else told.format_map(self.w)
        line = self.pick(*spoken) if isinstance(spoken, tuple) else spoken.format_map(self.w)
        return quote(self.rng, who.format_map(self.w), line, verb)


# -----------------------------------------------------------------------------
# the cast: who, where, what

def pronouns(prefix, he):
    him, his = ("him", "his") if he == "he" else ("her", "her")
    return {prefix + "he": he, prefix + "He": cap(he), prefix + "him": him, prefix + "his": his,
            prefix + "His": cap(his), prefix + "himself": him + "self"}


@functools.lru_cache(maxsize=None)
def outings(places, brave):
    """The (activity, place) pairs that go together, for places among `places`."""
    return [(act, p) for act in ACTIVITIES if act[5] or not brave for p in act[4].split() if p in places]


@functools.lru_cache(maxsize=None)
def things_that(tag):
    return tuple(t for t in THINGS if tag in t[1])


@functools.lru_cache(maxsize=None)
def zipf(names):
    """Cumulative weights 1/2, 1/3, 1/4, ...: the first names are common, as Lily and Tom are in TinyStories."""
    return list(itertools.accumulate(1 / (rank + 2) for rank in range(len(names))))


def other(rng, names, *taken):
    """A name (or kind) from names that is none of taken; the first few come up most often."""
    while True:
        name = rng.choices(names, cum_weights=zipf(names))[0]
        if name not in taken:
            return name


def make_cast(s, things, places, brave=False):
    """Fill s.w with a hero, a friend, a grown-up, a pet, a thing, an activity and a place."""
    rng, w = s.rng, s.w
    he = rng.choice(("he", "she"))
    if rng.random() < 0.75:
        w["name"] = other(rng, BOYS if he == "he" else GIRLS)
        w["kind"] = "boy" if he == "he" else "girl"
        w["hero_animal"] = ""
    else:
        w["name"] = other(rng, PET_NAMES)
        w["kind"] = w["hero_animal"] = rng.choice(ANIMAL_KINDS)
    w["a_kind"] = a(w["kind"])
    w.update(pronouns("", he))
    w["trait"] = rng.choice(TRAITS)
    w["a_trait"] = a(w["trait"])

    fhe = rng.choice(("he", "she"))
    if rng.random() < 0.65 and not w["hero_animal"] or rng.random() < 0.3:
        w["fname"] = other(rng, BOYS if fhe == "he" else GIRLS, w["name"])
        w["fkind"] = "boy" if fhe == "he" else "girl"
        w["friend_animal"] = ""
        w["friend_intro"] = rng.choice(("{his} friend {fname}", "{his} best friend {fname}")).format_map(w)
    else:
        w["fname"] = other(rng, PET_NAMES, w["name"])
        w["fkind"] = w["friend_animal"] = other(rng, ANIMAL_KINDS, w["hero_animal"])
        w["friend_intro"] = rng.choice(("{his} friend {fname} the {fkind}",
                                        "{his} best friend {fname} the {fkind}")).format_map(w)
    w.update(pronouns("f", fhe))
    w["pet"] = other(rng, PET_NAMES, w["name"], w["fname"])
    w["pkind"] = rng.choice(PETS)
    w["mom"] = rng.choice(("mom", "mom", "mom", "dad", "dad", "grandma", "grandpa"))
    w["Mom"] = cap(w["mom"])
    w.update(pronouns("m", PARENTS[w["mom"]]))

    noun, tags, adjectives = rng.choice(things)
    w["thing"] = noun
    w["noun"] = noun.split()[-1]
    w["thing_tags"] = tags
    w["thing_kind"] = next(t for t in tags if t in "twfo")
    w["adj"] = rng.choice(adjectives.split())
    w["adj_thing"] = f"{w['adj']} {noun}"
    w["a_thing"], w["a_adj_thing"] = a(noun), a(w["adj_thing"])

    (w["verb"], w["verb_past"], w["verb_ing"], whats, _, _), place = rng.choice(outings(places, brave))
    what = rng.choice(whats)
    w["act"], w["act_past"], w["act_ing"] = (f"{v} {what}" for v in (w["verb"], w["verb_past"], w["verb_ing"]))

    prep, adjectives, sights, high = PLACES[place]
    w["place"], w["padj"], w["high"] = place, rng.choice(adjectives.split()), high
    w["at_place"] = f"{prep} the {place}"
    w["At_place"] = cap(w["at_place"])
    w["sight"], w["sight2"] = rng.sample(sights, 2)
    w["day"] = rng.choice(DAYS)
    if w["hero_animal"]:
        w["home"] = ANIMALS[w["hero_animal"]]
    else:
        near = {"kitchen": "in a little yellow house", "yard": "in a little house with a big yard",
                "garden": "in a little house with a pretty garden"}.get(place, "in a little house near the {place}")
        w["home"] = rng.choice((near, "in a small town", "in a little house with a red door",
                                "in a big house on a quiet street")).format_map(w)


# -----------------------------------------------------------------------------
# paragraphs every shape uses

def opening(s, hint="", loves=""):
    """The first paragraph: who the hero is, what they love, their thing, and a hint when there is one."""
    first = s.pick(
        "Once upon a time, there was {a_trait} little {kind} named {name}.",
        "Once upon a time, there was a little {kind} named {name}. {He} was very {trait}.",
        "Once upon a time, {home}, there lived {a_trait} {kind} named {name}.",
        "There once was {a_trait} {kind} called {name}. {He} lived {home}.",
        "{name} was {a_trait} little {kind} who lived {home}.",
        "Once there was {a_kind} named {name}. {He} lived {home}.",
        "Once upon a time, there was {a_trait} {kind}. {His} name was {name}.",
    )
    loves = loves or s.pick(
        "{He} loved to {act}.", "{He} liked to {act} every day.", "More than anything, {he} loved to {act}.",
        "{His} favorite thing to do was to {act}.", "Every day, {he} wanted to {act}.",
        "{He} could {act} all day long.", "{name} loved to {act} with {his} friends.",
    )
    kind = s.w["thing_kind"]
    if kind == "f":
        thing = s.pick("{His} {mom} gave {him} {a_adj_thing} for a snack.",
                       "{His} {mom} had made {him} {a_adj_thing}.",
                       "{name} had {a_adj_thing} to eat later.")
    elif kind == "w":
        thing = s.pick("{He} had {a_adj_thing} that {he} loved to wear.",
                       "{His} {mom} gave {him} {a_adj_thing} to wear.",
                       "{His} favorite thing to wear was {his} {adj_thing}.")
    elif kind == "t":
        thing = s.pick("{He} had {a_adj_thing} that {he} loved very much.", "{His} favorite toy was {a_adj_thing}.",
                       "{His} {mom} had given {him} {a_adj_thing}, and {he} played with it every day.")
    else:
        thing = s.pick("{He} had {a_adj_thing} that {he} loved very much.",
                       "{name} had {a_adj_thing}, and {he} took it everywhere.",
                       "{His} {mom} had given {him} {a_adj_thing}.")
    sentences = [first, loves, thing] if s.rng.random() < 0.6 else [first, thing, loves]
    return sentences + ([hint] if hint else [])


def arrive(s, alone=False):
    """One day the hero (with the friend unless alone) goes to the place, or is in the kitchen."""
    if s.w["place"] == "kitchen":
        return s.pick("One {day} day, {name} was in the kitchen with {his} {mom}." if alone else
                      "One {day} day, {name} and {friend_intro} were in the kitchen with {his} {mom}.",
                      "One {day} morning, {name} went into the {padj} kitchen." if alone else
                      "One {day} morning, {friend_intro} came to play, and they went into the {padj} kitchen.")
    if alone:
        return s.pick("One {day} day, {name} went to the {place}.", "One day, {his} {mom} took {him} to the {place}.",
                      "One {day} morning, {name} went to {act} {at_place}.")
    return s.pick("One {day} day, {name} went to the {place} with {friend_intro}.",
                  "One day, {name} and {friend_intro} went to the {padj} {place}.",
                  "One {day} morning, {name} and {friend_intro} went to {act} {at_place}.",
                  "One day, {his} {mom} took {name} and {friend_intro} to the {place}.")


def outing(s, alone=False):
    """The hero goes out to the place, with the friend unless alone, and does the activity."""
    go = arrive(s, alone)
    if alone:
        fun = s.pick("{He} {act_past} and laughed.", "{He} had so much fun {act_ing}.",
                     "{He} {act_past} for a long time.")
    else:
        fun = s.pick("They {act_past} and laughed.", "They had so much fun {act_ing}.",
                     "{name} and {fname} {act_past} for a long time.", "They {act_past} all morning.")
    they = "{He}" if alone else "They"
    look = s.pick(they + " saw {sight} and {sight2}.", "{At_place}, there was so much to see: {sight} and {sight2}.",
                  "It was a {day} day {at_place}." if s.w["place"] != "kitchen" else "The kitchen smelled so good.",
                  "The sun was warm and the sky was blue." if s.w["place"] != "kitchen" else
                  "The sun was shining in through the window.")
    bring = s.pick("{name} took {his} {adj_thing} with {him}.", "{name} brought {his} {thing} too.",
                   "{name} did not forget {his} {thing}.")
    return [go, bring, look, fun] if s.rng.random() < 0.5 else [go, look, fun, bring]


def moral(s, that, rule):
    """A stated lesson: what the hero learned, or the moral in so many words."""
    s.w["that"], s.w["rule"] = that.format_map(s.w), rule.format_map(s.w)
    return s.pick("{name} learned that {that}.", "That day, {name} learned an important lesson: {that}.",
                  "{name} learned {his} lesson. From then on, {he} knew that {that}.",
                  "The moral of the story is: {rule}.", "{He} learned that {that}, and {he} never forgot it.")


def happy_close(s, together=True):
    """A happy last line: with the friend, or (at night, at home) alone."""
    if together:
        return s.pick("{name} and {fname} played together until the sun went down. They were very happy.",
                      "They laughed and played all day. It was the best day ever.",
                      "{name} smiled. {He} was glad to have a friend like {fname}.",
                      "From then on, {name} and {fname} were the best of friends.",
                      "They went home with big smiles on their faces.")
    return s.pick("{name} smiled a big smile.", "{name} felt happy and safe.",
                  "Soon {name} was fast asleep, with a smile on {his} face.")


def sad_close(s):
    return s.pick("{name} was very sad.", "{name} went home and cried.", "It was a sad day for {name}.",
                  "{He} sat down and cried.", "{name} felt sad for a long time.", "{He} walked home, sad and quiet.")


def ending(s, events, lesson):
    """The last paragraph: how things end, a happy or a sad close, then the moral when the story has one."""
    bad = s.has("BadEnding")
    p = events + [sad_close(s) if bad else happy_close(s, s.w.get("together", True))]
    if s.has("MoralValue"):
        p.append(moral(s, *lesson))
    return p


def quarrel(s, about):
    """A disagreement between the hero and the friend (the Conflict feature); about: what they both want."""
    s.w["about"] = about.format_map(s.w)
    return [
        s.say("{fname}", ("I want {about}!", "Give me {about}! It is my turn!"),
              ("{fname} wanted {about} too.", "{fname} said it was {fhis} turn to have {about}.")),
        s.say("{name}", ("No, it is mine!", "No! You cannot have it!"),
              ("But {name} did not want to give it.", "{name} said no.")),
        s.pick("They began to argue.", "They started to fight, and both of them got angry.",
               "{name} and {fname} were angry, and they argued and argued.", "Soon they were both mad."),
    ]


def make_up(s):
    return s.pick("{name} and {fname} said sorry to each other and stopped being angry.",
                  "Then {name} said sorry to {fname}. They were not mad at each other anymore.",
                  "{name} and {fname} hugged and stopped their fight.")


# -----------------------------------------------------------------------------
# story shapes: each makes the cast, writes the paragraphs and a one-sentence summary, and names the verbs
# (base forms) it may use, from which the instruction's verb is picked

def lost(s):
    """The thing goes missing at the place; a search, then it is found (or never seen again)."""
    make_cast(s, things_that("l"), OUTDOORS)
    fore, twist, bad, conflict = (s.has(f) for f in ("Foreshadowing", "Twist", "BadEnding", "Conflict"))
    hint = ""
    if fore and not bad:
        hint = s.pick("{name} had a {pkind} named {pet}, who liked to take things and hide them.",
                      "{name} also had a {pkind} called {pet}. {pet} loved to hide things in funny places.")
    elif fore:
        hint = s.say("{his} {mom}", ("Keep your {thing} in your bag, so you do not lose it.",
                                     "Keep your {thing} in your bag when you play."),
                     "{His} {mom} always told {him} to keep {his} {thing} in {his} bag.")
    s.w["spot"] = s.rng.choice(("on a big rock", "under a tree", "by the path", "on the grass", "next to a log"))
    problem = [s.pick("{name} put {his} {thing} down {spot} and went to {act}.",
                      "After a while, {name} put {his} {thing} {spot}."),
               s.pick("When {he} came back, the {thing} was gone!",
                      "Later, {he} looked for {his} {thing}, but it was not there.",
                      "But when {he} looked again, {his} {thing} was not {spot}!")]
    if conflict:
        problem += [s.say("{name}", ("{fname}, you took my {thing}!", "Give me back my {thing}, {fname}!"),
                          "{name} thought {fname} took {his} {thing}."),
                    s.say("{fname}", ("I did not take it!", "No, I did not take your {thing}!"),
                          "{fname} said {fhe} did not take it."),
                    s.pick("They began to argue.", "They argued and argued, and both of them got angry.",
                           "{name} was angry, and {fname} was angry too.")]
    else:
        problem += [s.say("{name}", ("Oh no! Where is my {thing}?", "My {thing} is gone! Where did it go?"),
                          ("{name} was worried. {His} {thing} was gone.", "{name} did not know what to do.")),
                    s.say("{fname}", ("Do not worry, I will help you find it.", "Let's look for it together!"),
                          ("{fname} said {fhe} would help {him} find it.", "{fname} wanted to help."))]

    search = s.pick("They looked under the bushes and behind the trees.", "They looked high and low.",
                    "They looked everywhere.")
    if fore and not bad:
        find = [search, s.pick("Then {name} remembered that {pet} liked to hide things.",
                               "Then {name} remembered {pet}, {his} {pkind}, who loved to hide things."),
                s.pick("{He} ran home and looked in {pet}'s bed.", "{He} ran to find {pet}."),
                s.pick("To {his} surprise, {pet} had the {thing} all along!") if twist else
                s.pick("There was the {thing}, safe and sound.", "And there it was: {his} {adj_thing}!")]
        summary = "{name} loses {his} {adj_thing} {at_place} and finds it when {he} thinks of {his} {pkind} " \
                  "{pet}, who likes to hide things."
    elif fore:
        find = [search, s.pick("{name} remembered that {his} {mom} told {him} to keep it in {his} bag.",
                               "Then {name} remembered what {his} {mom} said about keeping the {thing} in "
                               "{his} bag.")]
        find += ([s.pick("But it was too late. The {thing} was lost.", "But it was too late now.")] if not twist else
                 [s.pick("Then, to their surprise, a big bird flew over them with the {thing} in its beak!"),
                  s.pick("The bird flew far away.", "The bird flew away over the trees.")])
        summary = "{name} does not keep {his} {thing} in {his} bag as {his} {mom} said, and loses it {at_place}."
    elif twist and not bad:
        in_pocket = ("Then {name} looked in {his} pocket. To {his} surprise, the {thing} was there all along!"
                     if s.w["thing_kind"] != "w" else
                     "Then {fname} laughed and pointed at {name}. To {his} surprise, {he} had the {thing} on "
                     "all along!")
        find = [search, s.pick("Just then, a little puppy ran out of the bushes. To their surprise, it had the "
                               "{thing} in its mouth!", in_pocket,
                               "It turned out that a little bird had taken the {thing} to its nest! {fname} "
                               "climbed up and got it back."),
                s.pick("{name} laughed and laughed.", "Everyone laughed.")]
        summary = "{name} loses {his} {adj_thing} {at_place}, and it turns up in a surprising place."
    elif twist:
        find = [search, s.pick("To their surprise, a big bird flew down, took the {thing} and flew far away.",
                               "Then they saw it! But to their surprise, a big dog picked up the {thing} and "
                               "ran away with it.")]
        summary = "{name} looks for {his} lost {thing} {at_place}, but an animal takes it away."
    elif bad:
        find = [search, s.pick("But they could not find it.", "But the {thing} was nowhere to be found."),
                s.pick("Soon it got dark, and they had to go home.", "The sun went down, and it was time to go.")]
        summary = "{name} loses {his} {adj_thing} {at_place} and cannot find it."
    else:
        find = [search, s.pick("At last, {fname} found the {thing} in the tall grass.",
                               "Then {name} saw something under a big leaf. It was {his} {adj_thing}!",
                               "Then {fname} shouted and pointed. The {thing} was behind a rock!")]
        summary = "{name} loses {his} {adj_thing} {at_place}, and {fname} helps {him} find it."
    if conflict and not bad:
        find.append(make_up(s))
        summary = summary[:-1] + ", after blaming {fname} for taking it."

    if bad:
        lesson = ("{he} should take good care of {his} things", "take good care of your things")
        end = [s.pick("{name} never saw {his} {adj_thing} again.", "{His} {thing} was gone for good."),
               s.maybe(0.5, "{He} missed it very much.")]
        if conflict:
            end.append(s.pick("{fname} went home, and {name} was all alone.",
                              "{name} and {fname} did not play together that day."))
    else:
        lesson = s.rng.choice((("friends help each other", "help your friends when they need you"),
                               ("{he} should keep {his} things safe", "keep your things in a safe place")))
        if conflict:
            lesson = ("{he} should not say things that are not true", "do not blame others without asking")
        end = [s.pick("{name} hugged {his} {thing} and smiled.", "{name} held {his} {thing} tight."),
               s.say("{name}", ("Thank you, {fname}!", "Thank you for helping me, {fname}!"),
                     "{He} said thank you to {fname}."),
               s.maybe(0.5, "From then on, {he} kept {his} {thing} in a safe place.")]
    return [opening(s, hint), outing(s), problem, find, ending(s, end, lesson)], summary, \
        ("find", "look", "help", "hide", "keep")


def broken(s):
    """The thing breaks while they play; a grown-up mends it (or cannot)."""
    make_cast(s, things_that("b"), tuple(PLACES))
    fore, twist, bad, conflict = (s.has(f) for f in ("Foreshadowing", "Twist", "BadEnding", "Conflict"))
    hint = payoff = ""
    if fore and bad:
        hint, payoff = s.pick_set(
            ("But the {thing} was old, and it had a little crack in it.",
             "Then {name} remembered the little crack in the {thing}. {He} should have been more careful."),
            ("There was a little crack in the side of {his} {thing}, but {name} did not think about it.",
             "{name} remembered the little crack in the side. That is why it broke so fast."))
    elif fore:
        hint, payoff = s.pick_set(
            ("{His} {mom} kept a pot of strong glue on a high shelf, for when things broke.",
             "Then {name} remembered the pot of strong glue on the high shelf."),
            ("{name}'s {mom} had a big box of tools and could fix almost anything.",
             "Then {name} remembered {his} {mom}'s big box of tools."))

    if conflict:
        trouble = [s.pick("Then {fname} wanted to play with the {thing} too.",
                          "{fname} saw the {thing} and wanted it.")] + quarrel(s, "the {thing}") + [
            s.pick("They both pulled on the {thing}, harder and harder.",
                   "{fname} pulled one way, and {name} pulled the other way."),
            s.pick("Then, snap! The {thing} broke in two.", "Crack! The {thing} broke.")]
    else:
        trouble = s.pick_set(
            ("Then {name} tripped and fell.", "The {thing} fell on the hard ground and broke."),
            ("Then {name} ran too fast and fell down.", "Crack! The {thing} broke into pieces."),
            ("{name} threw the {thing} up high, but {he} did not catch it.", "It hit the ground and broke."),
            ("{name} put the {thing} on the edge of the table.", "Then it fell off and broke into pieces."),
            ("{fname} did not see the {thing} on the ground.", "{fHe} stepped on it by mistake, and it broke."),
            ("A big dog ran by and bumped into {name}.", "The {thing} fell out of {his} hands and broke."))
    trouble.append(s.say("{name}", ("Oh no! My {thing} is broken!", "My {adj_thing}! It is broken!"),
                         ("{name} looked at the broken {thing}. {His} eyes filled with tears.",
                          "{name} looked at the pieces and did not know what to do.")))

    s.w["breaks"] = ("{name} and {fname} fight over {name}'s {adj_thing} until it breaks" if conflict else
                     "{name}'s {adj_thing} breaks {at_place}").format_map(s.w)
    fix = [s.pick("{name} took the pieces to {his} {mom}.", "{name} and {fname} ran to find {his} {mom}.")]
    if payoff:
        fix.append(payoff)
    fix.append(s.say("{name}", ("Can you fix it, please?", "{Mom}, can you help me fix my {thing}?"),
                     ("{name} asked {his} {mom} to fix it.", "{name} asked {his} {mom} for help.")))
    if bad and twist:
        fix += [s.pick("{His} {mom} fixed the {thing} with glue."),
                s.pick("But to their surprise, the next day it broke again, and this time it could not be fixed.")]
        summary = "{breaks}, and after {his} {mom} glues it, it breaks again for good."
    elif bad:
        fix.append(s.pick("{His} {mom} tried and tried, but the {thing} was too broken to fix.",
                          "{His} {mom} looked at it and shook {mhis} head. It could not be fixed."))
        summary = "{breaks}, and it cannot be fixed."
    elif twist:
        fix += s.pick_set(("{His} {mom} got some glue and fixed it.",
                           "Then, to {his} surprise, {mhe} painted little stars all over it. Now it was even "
                           "prettier than before!"),
                          ("{His} {mom} looked at it closely.",
                           "It turned out that the {thing} was not so broken after all. One piece had only come "
                           "off, and it clicked right back on!"))
        summary = "{breaks}, and {his} {mom} fixes it as good as new or better."
    else:
        fix += [s.say("{his} {mom}", ("Let me see what I can do.", "Do not worry, I can fix it."),
                      "{His} {mom} said {mhe} would try."),
                s.pick("{mHe} put glue on the pieces and held them together.",
                       "{mHe} got some tape and glue and fixed it."),
                s.pick("Soon the {thing} was as good as new.", "Now the {thing} was as good as new.")]
        summary = "{breaks}, and {his} {mom} fixes it."

    if bad:
        end = [s.pick("They had to throw the {thing} away.", "{name} put the broken {thing} in a box.")]
        if conflict:
            end.append(s.pick("{fname} went home, and nobody played with {name}.",
                              "Now nobody could play with the {thing}."))
        lesson = (("fighting spoils the fun for everyone", "share instead of fighting") if conflict else
                  ("{he} should be careful with {his} things", "be gentle with your toys"))
    else:
        end = [make_up(s)] if conflict else []
        end.append(s.pick("{name} was so glad to have {his} {thing} back.",
                          "{name} gave {his} {mom} a big hug.", "{name} hugged {his} {mom} and said thank you."))
        if conflict:
            end.append(s.pick("This time, they took turns with the {thing}.",
                              "Then {name} and {fname} played with the {thing} together."))
        lesson = (("it is better to share than to fight", "share and take turns") if conflict else
                  s.rng.choice((("{he} should be careful with {his} things", "be gentle with your toys"),
                                ("it is good to ask for help", "ask for help when something goes wrong"))))
    return [opening(s, hint), outing(s), trouble, fix, ending(s, end, lesson)], summary, \
        ("fix", "break", "help", "share", "play")


STUCK_HOW = {
    "kite": "A big wind came and pulled the kite up, up, up. Then it got stuck {high}.",
    "balloon": "{name} let go of the string by mistake. The balloon floated up and got stuck {high}.",
    "ball": "{name} kicked the ball very hard. It flew up and got stuck {high}.",
    "toy plane": "{name} threw the plane into the air. It flew and flew, and then it got stuck {high}.",
}


def stuck(s):
    """The thing ends up somewhere high; a friend, a grown-up or luck gets it down (or the wind takes it)."""
    make_cast(s, things_that("s"), OUTDOORS)
    fore, twist, bad, conflict = (s.has(f) for f in ("Foreshadowing", "Twist", "BadEnding", "Conflict"))
    hint = ""
    if fore and bad:
        hint = s.pick("Where {name} lived, the wind could blow very hard. It made the windows rattle.",
                      "Where {name} lived, the wind was often very strong, and the trees would shake.")
    elif fore:
        hint = s.pick("{name}'s {mom} kept a tall ladder in the shed.",
                      "There was a tall old ladder in {name}'s shed.")
    up = [STUCK_HOW.get(s.w["thing"], "Then a big wind came and blew the {thing} away. It got stuck {high}.")
          .format_map(s.w),
          s.pick("{name} jumped and jumped, but {he} could not reach it.",
                 "{name} tried to reach it, but {he} was too small.", "It was much too high to reach.")]
    if conflict:
        up += [s.say("{fname}", ("You should have held on to it!", "It is your fault!"),
                     "{fname} said it was {name}'s fault."),
               s.say("{name}", ("It is not my fault!", "No, it is your fault!"),
                     "{name} said it was not {his} fault."),
               s.pick("They began to argue.", "They were both angry, and they argued for a long time."),
               make_up(s) if not bad else ""]
    else:
        up.append(s.say("{name}", ("My {thing} is stuck! I cannot reach it!", "Oh no! How will I get it down?"),
                        ("{name} was sad. {His} {thing} was stuck.", "{name} did not know how to get it down.")))

    get = []
    if bad:
        get.append(s.pick("They tried and tried, but the {thing} was too high.",
                          "{fname} tried to climb up, but it was too high."))
        if fore:
            get.append(s.pick("{name} remembered how strong the wind could be.",
                              "Then {name} remembered how hard the wind could blow."))
        if twist:
            get.append(s.pick("Then, to their surprise, a big bird landed next to the {thing}. It took the "
                              "{thing} in its beak and flew far away."))
            summary = "{name}'s {adj_thing} gets stuck {high}, and a bird takes it away."
        else:
            balloon = s.w["thing"] == "balloon"
            get.append(s.pick("Then the wind blew hard and pushed the balloon into a sharp branch. Pop! It was "
                              "gone." if balloon else "Then the wind blew hard and took the {thing} far, far away."))
            summary = "{name}'s {adj_thing} gets stuck {high}, and the wind " + (
                "pops it on a branch." if balloon else "takes it away.")
    elif fore:
        get += [s.pick("Then {name} remembered the tall ladder in the shed."),
                s.pick("{He} ran home and came back with {his} {mom} and the ladder."),
                s.pick("{His} {mom} climbed up and got the {thing} down.")]
        if twist:
            get.append(s.pick("To their surprise, there was a little bird's nest next to the {thing}, with three "
                              "blue eggs in it!"))
        summary = "{name}'s {adj_thing} gets stuck {high}, and {he} thinks of the ladder in the shed to get it down."
    elif twist:
        get += [s.pick("Just then, a big wind came. To their surprise, the {thing} fell right into {name}'s arms!",
                       "Then, to their surprise, a little squirrel ran along the branch and pushed the {thing} "
                       "down!")]
        summary = "{name}'s {adj_thing} gets stuck {high}, and then it comes down by surprise."
    else:
        animal = s.w["friend_animal"]
        helper = ("{fname} flew up and pushed the {thing} down with {fhis} wings." if animal in ("bird", "owl") else
                  "{fname} climbed up fast and got the {thing} down." if animal in ("squirrel", "monkey", "cat") else
                  "{fname} stretched up {fhis} long neck and got the {thing} down." if animal == "giraffe" else
                  "{fname} had an idea. {fHe} found a long stick and poked the {thing} until it fell down.")
        get += [s.say("{fname}", ("I can help!", "Do not worry, I have an idea."),
                      ("{fname} wanted to help.", "{fname} said {fhe} could help.")),
                helper.format_map(s.w)]
        summary = "{name}'s {adj_thing} gets stuck {high}, and {fname} helps get it down."

    if bad:
        end = [s.pick("{name} never saw {his} {thing} again.", "The {thing} was gone for good.")]
        lesson = ("{he} should hold on to {his} things", "hold on tight to the things you love")
    else:
        s.w["helper"], s.w["Helper"] = ("{his} {mom}".format_map(s.w), s.w["Mom"]) if fore else (s.w["fname"],) * 2
        end = [s.pick("{name} held {his} {thing} tight.", "{name} was so happy to have {his} {thing} back.")]
        if fore or not twist:
            end.append(s.say("{name}", ("Thank you, {Helper}!", "Thank you! You are the best!"),
                             "{name} said thank you to {helper}."))
        lesson = s.rng.choice((("working together makes hard things easy", "work together with your friends"),
                               ("it is good to ask for help", "ask for help when you need it")))
    return [opening(s, hint), outing(s), up, get, ending(s, end, lesson)], summary, \
        ("reach", "climb", "help", "get", "jump")


def brave(s):
    """The hero is scared to do the activity, tries, fails, and with a friend's help learns it (or gives up)."""
    make_cast(s, THINGS, tuple(PLACES), brave=True)
    fore, twist, bad, conflict = (s.has(f) for f in ("Foreshadowing", "Twist", "BadEnding", "Conflict"))
    hint = payoff = ""
    if fore and bad:
        hint = s.say("{his} {mom}", "You should wait until you are a little bigger.",
                     "{His} {mom} said {he} should wait until {he} was a little bigger.")
        payoff = s.pick("Then {name} remembered that {his} {mom} said to wait until {he} was bigger.")
    elif fore:
        hint = s.say("{his} {mom}", "If you keep trying, you will get better.",
                     "{His} {mom} always said that if you keep trying, you get better.")
        payoff = s.pick("Then {name} remembered what {his} {mom} said about trying.",
                        "Then {name} remembered {his} {mom}'s words about trying.")
    wish = s.pick("{name} wanted to {act}, but {he} was a little scared.",
                  "{name} wanted to {act} like the big kids, but {he} did not know how.",
                  "{name} had never tried to {act} before.")
    first = [arrive(s), s.pick("{fname} could {act} very well.", "{fname} was good at {act_ing}."),
             s.say("{fname}", ("Come on, let's {act}!", "Do you want to {act} with me?"),
                   "{fname} asked {name} to {act} with {fhim}."),
             s.pick("{name} tried, but it was too hard.", "{name} tried to {act}, but it did not go well.",
                    "The first time {name} tried, it went all wrong.")]
    if conflict:
        first += [s.pick("{fname} laughed at {him}."),
                  s.say("{name}", ("Stop laughing at me!", "It is not funny!"),
                        "{name} told {fname} to stop laughing."),
                  s.pick("They began to argue.", "{name} got angry, and they had a big fight.")]
    else:
        first.append(s.say("{name}", ("I cannot do it!", "It is too hard for me!"),
                           ("{name} felt like {he} could not do it.", "{name} wanted to give up.")))
    again = []
    if conflict:
        again.append(s.pick("Then {fname} said sorry for laughing.", "After a while, {fname} said sorry."))
    if payoff:
        again.append(payoff)
    if bad:
        again.append(s.pick("{He} tried one more time, but it went wrong again.", "{He} tried again and again, but "
                            "it was still too hard."))
        if twist:
            again.append(s.pick("Then, to {his} surprise, {fname} tried too, and {fhe} could not do it either! "
                                "{fHe} had only been pretending, so there was nobody to show {name} how.",
                                "It turned out that {fname} could not {act} at all. {fHe} had only been "
                                "pretending."))
        again.append(s.pick("In the end, {name} gave up.", "So {name} stopped trying."))
        summary = ("{fname} laughs at {name} when {he} tries to {act}, and in the end {he} gives up." if conflict else
                   "{name} tries to {act} with {fname}, but it is too hard, and {he} gives up.")
    else:
        again += [s.say("{fname}", ("You can do it! Try again!", "Do not give up. I will help you."),
                        ("{fname} told {him} not to give up.", "{fname} said {fhe} would help.")),
                  s.pick("{fname} showed {him} how to do it, one step at a time.",
                         "They tried again, slowly, together.", "{name} tried again, and again, and again.")]
        scared_too = twist and s.rng.random() < 0.5
        if scared_too:
            again.append(s.pick("Then, to {his} surprise, {fname} said that {fhe} had been scared too, the first "
                                "time."))
        again.append(s.pick("At last, {name} could {act}!", "And then {name} did it! {He} could {act}!"))
        if twist and not scared_too:
            again.append(s.pick("And to everyone's surprise, {he} did it even better than {fname}!"))
        summary = "{name} is scared to {act}, but with {fname}'s help {he} keeps trying and does it."
        if conflict:
            summary = summary[:-1] + ", even after they fight."

    if bad:
        end = [s.pick("{name} did not want to {act} anymore.", "{He} did not feel brave anymore.")]
        lesson = (("{he} should listen to {his} {mom}", "listen to your mom and dad") if fore else
                  ("giving up is easy, but trying is better", "never give up"))
    else:
        end = [s.pick("{name} was so proud of {himself}.", "{name} jumped for joy.", "{name} felt very proud."),
               s.pick("{He} could not wait to {act} again tomorrow.", "{His} {mom} gave {him} a big hug."),
               s.maybe(0.5, "That day, {name} kept {his} {adj_thing} close, like a lucky charm.")]
        lesson = s.rng.choice((("{he} should never give up", "never give up"),
                               ("being brave is easier with a friend", "be brave and keep trying")))
        if conflict:
            lesson = ("friends should help, not laugh", "help your friends instead of laughing at them")
    return [opening(s, hint, wish), first[:2], first[2:], again, ending(s, end, lesson)], summary, \
        ("try", "help", "give")


def weather(s):
    """Rain spoils the day out; they find fun indoors or a rainbow (or it stays a gloomy day)."""
    make_cast(s, THINGS, OUTDOORS)
    fore, twist, bad, conflict = (s.has(f) for f in ("Foreshadowing", "Twist", "BadEnding", "Conflict"))
    hint = ""
    if fore and bad:
        hint = s.say("{his} {mom}", "When you see dark clouds, rain is coming.",
                     "{His} {mom} always said that dark clouds mean rain is coming.")
    elif fore:
        hint = s.pick("{name} always kept a little raincoat in {his} bag, just in case.")
    rain = [s.pick("Then dark clouds came over the sky.", "Suddenly, the sun went away behind dark clouds.",
                   "Then the wind blew, and the sky got dark."),
            s.pick("Big drops of rain began to fall.", "Soon it began to rain, and then it rained hard.",
                   "Drip, drop! The rain came down.")]
    if conflict:
        rain += [s.say("{his} {mom}", ("Come inside, it is raining!", "Time to come in, it is too wet!"),
                       "{His} {mom} called them to come inside."),
                 s.say("{name}", ("No! I want to stay and {act}!", "No! I do not want to go in!"),
                       "But {name} wanted to stay and {act}."),
                 s.pick("{name} got angry and argued with {his} {mom}.",
                        "{name} stamped {his} feet. {He} was mad at {his} {mom}.")]
    else:
        rain.append(s.say("{name}", ("Oh no, it is raining!", "Oh no! Our day is ruined!"),
                          ("{name} was sad. {He} wanted to play outside.", "{name} and {fname} looked up at the "
                           "gray sky.")))
        rain.append(s.say("{fname}", ("Let's run home!", "Quick, let's go inside!"),
                          "{fname} said they should run home."))
    after = []
    if fore and not bad:
        after += [s.pick("Then {name} remembered the raincoat in {his} bag."),
                  s.pick("{He} put it on and held it over {fname} too. They stayed dry all the way home.")]
    elif fore:
        after.append(s.pick("{name} remembered what {his} {mom} said about dark clouds. {He} should have looked "
                            "at the sky."))
    if bad:
        after += [s.pick("They ran home, but they were wet and cold.", "By the time they got home, they were "
                         "wet all over."),
                  s.pick("{name} had left {his} {thing} outside, and the rain ruined it.",
                         "{His} {thing} fell in a big puddle and got ruined.")]
        if twist:
            after.append(s.pick("Then, to their surprise, the rain turned into a big storm. It rained all day "
                                "and all night."))
        summary = "{name}'s day {at_place} with {fname} is spoiled by the rain, and {his} {thing} gets ruined."
    else:
        after += [s.pick("They ran home and dried off.", "At home, they put on dry clothes."),
                  s.pick("{name}'s {mom} made them warm milk.", "{His} {mom} gave them warm towels and cookies."),
                  s.pick("Then they built a fort out of blankets and played inside.",
                         "They played with {name}'s {thing} inside the house.",
                         "They sat by the window and watched the rain.")]
        if twist:
            after.append(s.pick("Soon the rain stopped. To their surprise, there was a big rainbow over the "
                                "{place}!",
                                "It turned out that the rain made big puddles, and jumping in puddles was even "
                                "more fun!"))
        summary = "Rain ends {name}'s day {at_place} with {fname}, but they find a way to have fun anyway."
    if conflict:
        after.insert(0, s.pick("In the end, {name} went inside. {He} said sorry to {his} {mom}.",
                               "At last, {name} said sorry and came inside."))
        summary = summary[:-1] + ", after {name} argues with {his} {mom} about coming inside."

    if bad:
        end = [s.pick("{name} looked out at the gray sky.", "{name} sat by the window all day.")]
        lesson = (("{he} should listen to {his} {mom}", "listen to your mom and dad") if conflict else
                  ("it is good to be ready for rain", "always look at the sky before you go out"))
    else:
        end = [s.pick("It was a fun day after all.", "{name} and {fname} had fun, rain or no rain.")]
        lesson = (("{he} should listen to {his} {mom}", "listen to your mom and dad") if conflict else
                  ("it is good to be ready", "always be ready for rain") if fore else
                  ("a rainy day can be fun too", "make the best of every day"))
    return [opening(s, hint), outing(s), rain, after, ending(s, end, lesson)], summary, \
        ("rain", "play", "stay", "run")


def share(s):
    """The friend wants the hero's thing; they quarrel, then share (or spoil it for both)."""
    make_cast(s, things_that("t") + things_that("f"), OUTDOORS)
    fore, twist, bad = (s.has(f) for f in ("Foreshadowing", "Twist", "BadEnding"))
    hint = payoff = ""
    if fore and bad:
        hint = s.pick("But the {thing} was very slippery, and it was easy to drop.")
        payoff = s.pick("{name} remembered how slippery the {thing} was, but it was too late.")
    elif fore:
        hint = s.say("{his} {mom}", ("Sharing makes everything more fun.", "Things are more fun when you share."),
                     "{His} {mom} always said that sharing makes everything more fun.")
        payoff = s.pick("Then {name} remembered what {his} {mom} said about sharing.")
    meet = outing(s, alone=True) + [s.pick("Then {friend_intro} came by.", "Soon {friend_intro} came to play.")]
    fight = [s.pick("{fname} saw the {thing}.", "{fname} looked at the {adj_thing}.")]
    fight += quarrel(s, "the {thing}")
    fight.append(s.pick("{fname} tried to take the {thing}.", "They both held on to the {thing} and pulled."))
    food = s.w["thing_kind"] == "f"
    end_part = []
    if bad:
        if payoff:
            end_part += [s.pick("The {thing} slipped out of their hands and fell into the mud."), payoff]
        elif not twist:
            end_part.append(s.pick("The {thing} slipped out of their hands and fell into the mud.",
                                   "They pulled so hard that the {thing} fell in the mud." if food else
                                   "They pulled so hard that the {thing} broke."))
        if twist:
            end_part.append(s.pick("Then, to their surprise, a big dog ran by, grabbed the {thing} and ran away "
                                   "with it!"))
        end_part.append(s.pick("Now nobody could have it.", "Now it was no good for anyone."))
        summary = "{name} and {fname} fight over {name}'s {adj_thing}, and in the end nobody gets it."
        end = [s.pick("{fname} went home.", "{name} and {fname} did not play together that day.")]
        lesson = ("fighting spoils the fun for everyone", "share instead of fighting")
    else:
        if payoff:
            end_part.append(payoff)
        end_part.append(s.pick("{name} looked at {fname}'s sad face.", "Then {name} stopped pulling."))
        end_part.append(s.say("{name}", ("Let's share it!", "We can take turns." if not food else
                                         "We can share it. Half for you, half for me."),
                              ("{name} said they could share it.", "{name} said they could take turns."
                               if not food else "{name} said they could each have half.")))
        end_part.append(s.pick("{name} broke the {thing} in two and gave half to {fname}." if food else
                               "They took turns with the {thing}.",
                               "{fname} smiled, and they shared the {thing}."))
        if twist:
            end_part.append(s.pick("Then, to {name}'s surprise, {fname} took out a bag of cookies and shared "
                                   "them too!" if food else
                                   "It turned out that {fname} knew a new game to play with the {thing}. It was "
                                   "the most fun game ever!"))
        summary = "{name} does not want to share {his} {adj_thing} with {fname}, but after a fight they share it."
        end = [s.pick("Playing together was much more fun.", "Sharing was better than fighting.")]
        lesson = s.rng.choice((("sharing is more fun than fighting", "share with your friends"),
                               ("it is good to share", "always share with others")))
    return [opening(s, hint), meet, fight, end_part, ending(s, end, lesson)], summary, \
        ("share", "take", "give", "play", "want")


# what a grown-up warns about: (places, the warning, told, what the hero does, how it goes wrong, how it is
# saved, summary of the warning); shared words tie the hint to the payoff
WARNINGS = (
    (WATER, "Do not go too close to the water.", "{His} {mom} always told {him} not to go too close to the water.",
     "{name} wanted to see the fish, so {he} went right to the edge of the water.",
     "{His} foot slipped, and {his} {thing} fell into the water. It floated far away.",
     "{His} foot slipped, and {he} fell into the water! {fname} grabbed {his} hand and pulled {him} out.",
     "go too close to the water"),
    (("park", "forest", "yard", "jungle", "meadow", "field", "hill"),
     "Do not climb the big tree. It is too high.", "{His} {mom} always told {him} not to climb the big tree.",
     "{name} saw the big tree and started to climb. {He} went higher and higher.",
     "Then {he} slipped and fell down. {He} hurt {his} arm, and {his} {thing} was broken too.",
     "Then {he} looked down. It was so high! {He} was too scared to climb down. {fname} ran to get {his} {mom}, "
     "who came with a ladder and helped {him} down.",
     "climb the big tree"),
    (OUTDOORS, "Do not play in the mud with your {thing}.",
     "{His} {mom} always told {him} not to play in the mud with {his} {thing}.",
     "Then {name} saw a big mud puddle. {He} jumped right in with {his} {thing}. Splash!",
     "Mud went all over {his} {thing}. {He} tried to wash it, but the mud would not come off.",
     "Mud went all over {his} {thing}. {He} and {fname} washed it in a bucket of water until it was clean again.",
     "play in the mud with {his} {thing}"),
)


def warning(s):
    """A grown-up warns the hero (the early hint); the hero does it anyway and pays for it (or is saved)."""
    scene = s.rng.choice(WARNINGS)
    places, spoken, told, act, hurt, saved, what = scene
    make_cast(s, THINGS, places)
    bad, conflict = s.has("BadEnding"), s.has("Conflict")
    warn = s.say("{his} {mom}", spoken, told)
    tempt = [act.format_map(s.w)]
    if conflict:
        tempt += [s.say("{fname}", "Stop! Your {mom} said not to!", "{fname} told {him} to stop."),
                  s.say("{name}", ("I do not care! I want to!", "You are not my {mom}!"),
                        "{name} did not want to listen."),
                  s.pick("They began to argue.", "{name} and {fname} argued, and they both got angry.")]
    else:
        tempt.append(s.pick("{He} did not listen.", "{name} did not think about what {his} {mom} said."))
    s.w["what"] = what.format_map(s.w)
    payoff = [(hurt if bad else saved).format_map(s.w),
              s.pick("{name} remembered that {his} {mom} had said not to {what}.",
                     "Then {name} remembered {his} {mom}'s words: do not {what}.")]
    if bad:
        end = [s.pick("{He} went home, wet and cold." if places is WATER else "{He} went home slowly.",
                      "{He} should have listened.")]
        summary = "{name} does not listen when {his} {mom} tells {him} not to {what}, and it ends badly."
    else:
        end = [s.pick("When they got home, {name} told {his} {mom} what happened.",
                      "{name} went home and told {his} {mom} everything."),
               s.say("{name}", ("I am sorry. I will listen next time.", "I should have listened. I am sorry."),
                     "{name} said sorry to {his} {mom} and promised to listen next time."),
               s.pick("{His} {mom} gave {him} a big hug.", "{His} {mom} smiled and hugged {him}."),
               s.pick("{name} was glad to be safe.", "Everyone was happy that {name} was safe.")]
        if conflict:
            end.insert(0, s.pick("{name} said sorry to {fname} too, for being angry."))
        summary = "{name} does not listen when {his} {mom} tells {him} not to {what}, but {he} is saved and " \
                  "says sorry."
    lesson = ("{he} should always listen to {his} {mom}", "listen to your mom and dad")
    return [opening(s, warn), outing(s), tempt, payoff, ending(s, end, lesson)], summary, \
        ("listen", "climb", "play", "go")


# a small animal in trouble: (who, what is wrong, how it ends well, how it ends badly)
CRITTERS = (
    ("bird", "a little bird on the ground", "It had a hurt wing and could not fly.",
     "After a few days, the bird's wing was better, and it flew up into the sky."),
    ("puppy", "a little puppy sitting all alone", "It was lost and could not find its home.",
     "They found the puppy's home at the end of the street. The puppy's family was so glad to see it."),
    ("duck", "a baby duck", "It could not find its mom.",
     "They walked with the duck until they found its mom by the water. The little duck was happy."),
    ("kitten", "a little kitten under a bush", "It was cold and hungry.",
     "Soon the kitten was warm and full, and it purred a happy purr."),
)


def kindness(s):
    """The hero finds a small animal in trouble and helps it (or it is lost again)."""
    make_cast(s, THINGS, OUTDOORS)
    fore, twist, bad, conflict = (s.has(f) for f in ("Foreshadowing", "Twist", "BadEnding", "Conflict"))
    s.w["critter"], desc, trouble, fine = s.rng.choice(CRITTERS)
    s.w["critter_desc"] = desc
    hint = ""
    if fore and bad:
        hint = s.pick("{name}'s yard had an old gate that did not close well.")
    elif fore:
        hint = s.pick("{name} always kept some bread crumbs in {his} pocket, just in case.")
    find = [s.pick("Then they saw {critter_desc}.", "Under a bush, {name} found {critter_desc}.",
                   "Suddenly, {name} heard a little cry. It was {critter_desc}."),
            trouble,
            s.say("{name}", ("Poor little {critter}! We have to help it.", "Look! It needs our help!"),
                  ("{name} wanted to help it.", "{name} felt sorry for the little {critter}."))]
    if conflict:
        find += [s.say("{fname}", ("Let's leave it. I want to {act}!", "No, let's go play!"),
                       "But {fname} wanted to leave it and go play."),
                 s.pick("They began to argue.", "They argued, and {name} got angry."),
                 s.pick("In the end, {fname} said sorry and agreed to help.")]
    kind = s.w["thing_kind"]
    care = [s.pick("{name} gave it some of {his} {thing}." if kind == "f" else
                   "{name} put it in {his} {thing} to keep it safe." if "c" in s.w["thing_tags"] else
                   "{name} gave it {his} {thing} to play with, so it would not be scared." if kind == "t" else
                   "{name} picked it up gently and held it close to keep it warm.")]
    if fore and not bad:
        care.insert(0, s.pick("Then {name} remembered the bread crumbs in {his} pocket. {He} gave some to the "
                              "{critter}."))
    care.append(s.pick("They took it home and gave it a soft bed.", "They took good care of it all day."))
    if bad:
        if fore and twist:
            care.append(s.pick("But in the night, to their surprise, a big fox came in through the old gate and "
                               "chased the {critter} away. {name} remembered that the gate did not close well."))
        elif fore:
            care.append(s.pick("But in the night, the {critter} ran out through the old gate. {name} remembered "
                               "that the gate did not close well."))
        elif twist:
            care.append(s.pick("But then, to their surprise, a big dog came and scared the {critter} away."))
        else:
            care.append(s.pick("But the next morning, the little bed was empty. The {critter} was gone."))
        summary = "{name} and {fname} find {critter_desc} {at_place} and take care of it, but it runs away."
        end = [s.pick("They looked and looked, but they never saw the {critter} again.")]
        lesson = ("{he} should have closed the gate", "keep your pets safe") if fore else \
                 ("some things we cannot keep, even when we love them", "love animals, but let them be free")
    else:
        care.append(fine)
        if twist:
            care.append(s.pick("The next day, to their surprise, the {critter} came back with its whole family "
                               "to say thank you!",
                               "It turned out that the {critter} lived just next door, and now it came to play "
                               "every day!"))
        summary = "{name} and {fname} find {critter_desc} {at_place} and help it."
        end = [s.pick("{name} felt warm inside.", "{name} and {fname} were proud of what they did.")]
        lesson = s.rng.choice((("it is good to be kind to animals", "be kind to all animals, big and small"),
                               ("helping others makes you happy too", "always help those in need")))
    if conflict:
        summary = summary[:-1] + ", after arguing about it."
    return [opening(s, hint), outing(s), find, care, ending(s, end, lesson)], summary, \
        ("help", "take", "keep", "give")


def noise(s):
    """A strange noise at night scares the hero; it turns out to be something harmless (or a hungry goat)."""
    make_cast(s, things_that("t") + things_that("w"), ("garden", "yard", "farm"))
    fore, bad = s.has("Foreshadowing"), s.has("BadEnding")
    s.w["together"] = False
    hint = ""
    if fore and not bad:
        hint = s.pick("{name} had a {pkind} named {pet} who liked to play at night.")
    elif fore:
        hint = s.pick("There was a goat {at_place} next door, and it ate everything it could find.")
    night = [s.pick("One night, {name} was in bed.", "One dark night, {name} could not sleep."),
             s.pick("{He} had left {his} {thing} out {at_place}." if bad else
                    "{His} {thing} was next to {his} bed.", "{His} {thing} was right next to {him}." if not bad else
                    "{His} {thing} was still out {at_place}."),
             s.pick("Then {he} heard a noise. Scratch, scratch, scratch!", "Then {he} heard a noise. Bump! Bump!",
                    "Then {he} heard a strange noise outside."),
             s.say("{name}", ("Who is there?", "What was that?"),
                   ("{name} was scared.", "{name} pulled the blanket over {his} head."))]
    look = [s.pick("{name} called {his} {mom}.", "{name} ran to get {his} {mom}."),
            s.pick("{His} {mom} came with a flashlight.", "{His} {mom} took {his} hand."),
            s.pick("Together, they looked out the window at the {place}.", "They went outside to look.")]
    if fore and not bad:
        look.append(s.pick("Then {name} remembered that {pet} liked to play at night."))
    if bad:
        if fore:
            look.append(s.pick("{name} remembered the goat next door that ate everything."))
        look.append(s.pick("To {his} surprise, it was a big goat, and it was eating {his} {adj_thing}!"))
        summary = "A noise in the night turns out to be a goat eating {name}'s {adj_thing}."
        end = [s.pick("In the morning, there was nothing left of the {thing}.", "The {thing} was all chewed up.")]
        lesson = ("{he} should put {his} things away before bed", "put your things away before bed")
    else:
        look.append(s.pick("To {his} surprise, it was only {pet}, playing with a ball of yarn!",
                           "It turned out that the noise was {pet}, chasing a moth around the {place}!") if fore else
                    s.pick("To {his} surprise, it was only a little hedgehog looking for food.",
                           "It turned out that the noise was a mom hen and her little chicks!",
                           "To {his} surprise, it was only a big, round owl sitting on the fence."))
        summary = "{name} hears a scary noise at night, but it turns out to be something harmless."
        end = [s.pick("{name} laughed.", "{name} giggled."),
               s.pick("{He} went back to bed and hugged {his} {thing}." if not bad else "",
                      "{He} was not scared anymore.")]
        lesson = ("there is nothing to be scared of in the dark", "do not be scared of the dark")
    return [opening(s, hint), night, look, ending(s, end, lesson)], summary, ("hear", "look", "sleep")


# name: (writer, features it needs, features it cannot show, how often)
SHAPES = {
    "lost": (lost, (), (), 3), "broken": (broken, (), (), 2), "stuck": (stuck, (), (), 2),
    "brave": (brave, (), (), 2), "weather": (weather, (), (), 2), "share": (share, ("Conflict",), (), 3),
    "warning": (warning, ("Foreshadowing",), ("Twist",), 3), "kindness": (kindness, (), (), 2),
    "noise": (noise, ("Twist",), ("Conflict",), 2),
}


# -----------------------------------------------------------------------------
# a whole record

def pick_features(rng):
    return [f for f in FEATURES if rng.random() < FEATURE_CHANCE[f]]


def instruction_prompt(words, features):
    """TinyStories' instruction wording; with no features the features sentence is left out, as there."""
    verb, noun, adjective = words
    text = ("Write a short story (3-5 paragraphs) which only uses very simple words that a 3 year old child would "
            f'understand. The story should use the verb "{verb}", the noun "{noun}" and the adjective '
            f'"{adjective}". ')
    if features:
        text += "The story has the following features: " + ", ".join(FEATURE_TEXT[f] for f in features) + ". "
    return text + "Remember to only use simple words!\n\nPossible story:"


def choose_words(s, story, plot_verbs):
    """[verb, noun, adjective] from the story's own words: the verb in its base form, all whole words."""
    w, rng = s.w, s.rng
    used = set(re.findall(r"[A-Za-z]+", story))
    verbs = [v for v in (w["verb"],) + plot_verbs if v in used]
    nouns = [n for n in (w["noun"], w["place"], w["hero_animal"], w["friend_animal"], w["pkind"]) if n in used]
    adjectives = [j for j in (w["adj"], w["trait"], w["padj"], w["day"]) if j in used]
    # the story's own activity and thing are its centre, so they are the likeliest words
    verb = verbs[0] if rng.random() < 0.5 else rng.choice(verbs)
    noun = nouns[0] if rng.random() < 0.5 else rng.choice(nouns)
    return [verb, noun, rng.choice(adjectives)]


def fits(shape, features):
    _, needs, cannot, _ = SHAPES[shape]
    return all(f in features for f in needs) and not any(f in features for f in cannot)


@functools.lru_cache(maxsize=None)
def shapes_for(features):
    """The shapes that can show these features (lost, broken, ... show any), and how often to pick each."""
    shapes = [name for name in SHAPES if fits(name, features)]
    return shapes, [SHAPES[name][3] for name in shapes]


def make_story(rng):
    """One record in the TinyStories schema, drawn from rng."""
    features = pick_features(rng)
    shapes, weights = shapes_for(tuple(features))
    return tell(rng, rng.choices(shapes, weights)[0], features)


def tell(rng, shape, features):
    """A record of the given shape with the given features (a list in FEATURES order)."""
    while True:
        s = Scene(rng, features)
        paragraphs, summary, plot_verbs = SHAPES[shape][0](s)
        paragraphs = [" ".join(x for x in p if x) for p in paragraphs]
        while len(paragraphs) > 3 and rng.random() < 0.35:  # sometimes two paragraphs run together (never the
            i = rng.randrange(len(paragraphs) - 2)            # last: it alone shows how the story ends)
            paragraphs[i:i + 2] = [paragraphs[i] + " " + paragraphs[i + 1]]
        story = "\n".join(paragraphs)  # one newline between paragraphs, as in TinyStories
        if MIN_WORDS <= len(story.split()) <= MAX_WORDS:
            break
    words = choose_words(s, story, plot_verbs)
    return {"story": story,
            "instruction": {"prompt:": instruction_prompt(words, features), "words": words, "features": features},
            "summary": cap(summary.format_map(s.w)), "source": SOURCE}


# -----------------------------------------------------------------------------
# shards

def shard_path(out_dir, index):
    return os.path.join(out_dir, f"data{index:02d}.json")


def write_shard(out_dir, index, stories_per_shard, seed):
    """Write one shard; its stories depend only on (seed, index)."""
    rng = random.Random(f"story_corpus:{seed}:{index}")
    records = [make_story(rng) for _ in range(stories_per_shard)]
    path = shard_path(out_dir, index)
    with atomic_output(path) as f:
        f.write(json.dumps(records).encode())
    return path


def write_corpus(out_dir, num_shards=10, stories_per_shard=12500, seed=0, progress=True):
    """Write out_dir/data00.json ..: JSON lists of story records, the same bytes for the same arguments.

    The defaults make 125,000 stories, about 100 MB of story text, in well under a minute on two cores."""
    if num_shards < 1 or stories_per_shard < 1:
        raise UserError(f"need at least one shard of at least one story, got --num_shards={num_shards} "
                        f"--stories_per_shard={stories_per_shard}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir} is a file, not a folder: give another --out_dir or move the file away")
    os.makedirs(out_dir, exist_ok=True)
    workers = min(num_shards, os.cpu_count() or 1)
    shard = functools.partial(write_shard, out_dir, stories_per_shard=stories_per_shard, seed=seed)
    with tqdm(total=num_shards * stories_per_shard, unit="stories", desc="writing stories", disable=not progress) \
            as bar:
        for _ in map_in_processes(shard, range(num_shards), workers):
            bar.update(stories_per_shard)
    return [shard_path(out_dir, i) for i in range(num_shards)]


@cli
def main(argv=None):
    configure(globals(), argv)
    rng = random.Random(seed)
    for _ in range(num_stories):
        r = make_story(rng)
        print(f"{r['instruction']['prompt:']}\n\n{r['story']}\n\nSummary: {r['summary']}\n{'-' * 80}")


if __name__ == "__main__":
    main()
