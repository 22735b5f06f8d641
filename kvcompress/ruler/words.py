"""The vocabulary and filler text the offline RULER generator uses instead of outside data.

RULER draws needle keys and the common-words list from the ``wonderwords`` word lists, and its "essay"
haystack from Paul Graham's essays. Neither may be fetched at run time here, and the generator must give
the same samples on every machine whatever is installed, so this module ships its own small English
vocabulary (written for this project) and builds the essay substitute from it: grammatical, varied
sentences ("The quiet engineer repairs a wooden bridge near the harbor.") made by a seeded generator.
The substitution is documented in docs/benchmarks.md: the essay filler is less natural than real prose,
which makes retrieval in it somewhat easier than in RULER's essays.
"""

from __future__ import annotations

import random

NOUNS = """
account actor airport album anchor angle animal answer apple archive arm army arrow artist atlas attic
author autumn badge bakery balcony ball balloon band banner barn basket battery beach beacon bean bear
bell bench berry bicycle bird blanket boat bone book border bottle boulder box branch bread bridge
brush bucket budget cabin cable cactus camera camp canal candle canyon captain carpet castle cat cave
cellar chair chapter chart cheese chess chimney circle citizen city cliff clock cloud coast coffee coin
comet compass concert copper corner cottage council country cousin crane crater crowd crystal cup
curtain cushion dance desert desk diamond diary dinner doctor dolphin door dragon drawer dream drum
eagle earth editor elephant elevator engine envelope falcon farm feather fence festival field film
finger fire flag flame flower flute forest fork fountain fox frame galaxy garden gate giant glacier
glass glove goat gold guitar hammer harbor harvest hat hawk helmet hill history honey horizon horse
hospital hotel island ivory jacket jar jewel journey judge jungle kettle key kitchen kite ladder lake
lamp lantern lawyer leaf lemon letter library lighthouse lion lizard lobster lock magnet mango map
marble market meadow melody mirror monkey moon mountain museum needle nest newspaper night notebook
ocean office olive orange orchard otter owl oyster painter palace paper parade park parrot passenger
pebble pencil pepper piano picture pillow pilot planet plate poem pond portrait potato prairie prince
puzzle pyramid quarry queen rabbit radio rainbow raven recipe ribbon river robot rocket roof rose
sailor salmon sandal satellite saucer scarf school scientist sculpture season shadow shell shelf ship
shoe signal silver singer skyline sled snake soldier song spider spoon spring square stadium star
station statue stone storm stream street studio sugar summer sunset swan sword table tailor teacher
telescope temple tent theater thunder ticket tiger timber tomato tower tractor train treasure tree
truck trumpet tunnel turtle umbrella valley vase village violin volcano wagon wallet walnut wardrobe
waterfall wave whale wheel whistle window winter wizard wolf workshop yacht zebra
""".split()

ADJECTIVES = """
able absent active agile ancient angry anxious bitter black bold brave bright brief brisk broad broken
busy calm careful cheap cheerful chilly clean clever cloudy clumsy cold cosy crisp cruel curious
damp dark dear deep delicate dense distant dizzy dry dusty eager early earnest easy elegant empty
endless equal exact fair faint faithful famous fancy fast fierce fine firm flat fluffy fond fragile
free fresh friendly frozen gentle giant glad gloomy golden graceful grand green grumpy happy hard
heavy hidden hollow honest huge humble hungry icy idle jolly keen kind large late lazy light little
lively lonely long loud lovely loyal lucky mellow merry mighty mild modern modest muddy narrow neat
nervous new noble noisy odd old open orange pale patient plain pleasant polite poor proud purple
quick quiet rapid rare raw ready red rich rough round royal rusty sacred sad safe salty scarlet secret
shallow sharp shiny short shy silent silly simple sleepy slim slow small smooth soft solid sour spare
steady steep sticky stormy strange strict strong sturdy sudden sunny sweet swift tall tame tender
thick thin tidy tiny tired tough tranquil true ugly vast velvet vivid warm weary wet white wide wild
wise witty wooden young zealous
""".split()

VERBS = """
accept admire answer arrange arrive bake balance borrow build calculate carry catch celebrate change
chase check choose clean climb collect compare cook copy count cover crack cross dance decorate
deliver describe design discover draw dream drive enjoy examine explain explore fetch fill find fix
fold follow gather grow guard guide help hide hold hunt imagine improve inspect invent join jump
kick knit laugh lead learn lift listen load march measure mend mix move notice obey offer open order
paint pass pause plant play polish pour prepare print protect pull push question reach read record
repair repeat rescue return ride row sail scatter search select sell send sew share shout sing sketch
slide sort spend study support sweep swim teach test throw touch trace trade travel wander wash watch
weave whisper wrap write
""".split()

PREPOSITIONS = ["near", "behind", "beside", "under", "above", "across", "inside", "beyond", "around", "toward"]


def third_person(verb: str) -> str:
    """``carry`` -> ``carries``, ``watch`` -> ``watches``, ``read`` -> ``reads``."""
    if verb.endswith(("s", "sh", "ch", "x", "z")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(rng: random.Random, definite: bool) -> str:
    noun = rng.choice(NOUNS)
    if rng.random() < 0.6:
        noun = f"{rng.choice(ADJECTIVES)} {noun}"
    return f"the {noun}" if definite else f"{article(noun)} {noun}"


def essay_sentence(rng: random.Random) -> str:
    """One sentence of the essay substitute, from a handful of sentence shapes."""
    subject = _noun_phrase(rng, True)
    obj = _noun_phrase(rng, rng.random() < 0.5)
    place = _noun_phrase(rng, True)
    verb = third_person(rng.choice(VERBS))
    prep = rng.choice(PREPOSITIONS)
    shape = rng.randrange(8)
    if shape == 0:
        text = f"{subject} {verb} {obj} {prep} {place}."
    elif shape == 1:
        text = f"Every {rng.choice(['morning', 'evening', 'winter', 'summer', 'week', 'year'])}, {subject} {verb} {obj}."
    elif shape == 2:
        text = f"Nobody expected that {subject} would {rng.choice(VERBS)} {obj} so {rng.choice(['quickly', 'calmly', 'carefully', 'often', 'rarely'])}."
    elif shape == 3:
        text = f"{subject} is {rng.choice(ADJECTIVES)}, and {place} is {rng.choice(ADJECTIVES)}."
    elif shape == 4:
        text = f"When {subject} {verb} {obj}, {place} {third_person(rng.choice(VERBS))} {_noun_phrase(rng, False)}."
    elif shape == 5:
        text = f"Some people say that {subject} {verb} {obj} {prep} {place} because it is {rng.choice(ADJECTIVES)}."
    elif shape == 6:
        text = f"In the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}, {subject} {verb} {obj}."
    else:
        text = f"It is {rng.choice(ADJECTIVES)} to {rng.choice(VERBS)} {obj} {prep} {place}."
    return text[0].upper() + text[1:]


def essay_words(rng: random.Random, count: int) -> list[str]:
    """At least ``count`` whitespace-separated words of seeded essay text, ending at a sentence end."""
    words: list[str] = []
    while len(words) < count:
        words.extend(essay_sentence(rng).split())
    return words


def key_words() -> list[str]:
    """Needle keys as RULER makes them: ``adjective-noun`` pairs, sorted."""
    return sorted({f"{a}-{n}" for a in ADJECTIVES for n in NOUNS})


def common_words_vocabulary() -> list[str]:
    """Single words for common-words extraction: nouns, adjectives and verbs, without duplicates, sorted."""
    return sorted(set(NOUNS) | set(ADJECTIVES) | set(VERBS))
