"""Seeded synthetic task domains in the ESFT messages format, small enough for a ~3M-parameter MoE
with a byte-level BPE tokenizer of a few thousand tokens to learn on a CPU.

Every row is `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`; the assistant
turn is also the reference that METRIC scores against. The domains differ in vocabulary and
structure, as real downstream tasks do:

- math: one- or two-step word problems about people and objects (+, -, *; operands mostly 1-20,
  results never negative), answered with a worked line: "7 + 5 = 12. The answer is 12."
- code: tiny Python programs (variable arithmetic, string methods, slices, repetition) -> exactly
  what they print.
- intent: an assistant request (flights, tables, alarms, weather, music, ...) -> one-line JSON
  `{"intent": ..., "slots": {...}}` with slots in a fixed order per intent.
- law: a fact pattern about a defendant -> a verdict fixed by the rules in `law_verdict`.
- translation: English subject-verb-object sentences -> Veltish, an invented language with a
  bijective lexicon (VELTISH), a definite particle, adjectives after nouns, a plural suffix,
  place phrases with postpositions and the verb last.
- summary: a 4-6 sentence local-news passage with distracting background -> one sentence naming
  who did what, where and when.
- general: everyday questions and answers (objects, stories, facts, recipes, schedules, opening
  hours, lists, greetings) with numbers and punctuation in running text. It is pretrained on and
  used to measure forgetting, so it never uses the formats of the held-out tasks.

Rows come from `random.Random(f"{domain}:{split}:{seed}")` (str seeds are hashed with sha512, not
the salted `hash()`), so they are identical in every process. Train and eval are split by a stable
hash of the prompt (zlib.crc32), so an eval prompt never occurs in train, whatever the seeds.
All text is ASCII, so the files are the same bytes whatever the locale's default encoding.
"""

from __future__ import annotations

import json
import operator
import random
import zlib
from collections.abc import Callable
from pathlib import Path

from esft.errors import EsftError
from esft.io import atomic_write_text

TASKS = ("math", "code", "intent", "law", "translation", "summary")
GENERAL = "general"
METRIC = {"math": "numeric", "code": "exact_match", "intent": "intent", "law": "exact_match",
          "translation": "chrf", "summary": "rouge_l"}
PRETRAIN_TASKS = ("intent", "law", "summary")  # seen in pretraining
HELD_OUT_TASKS = ("math", "code", "translation")  # downstream tasks, never in pretraining
SPLITS = ("train", "eval")
EVAL_BUCKETS = 10  # one prompt-hash bucket in ten belongs to eval

Example = tuple[str, str]  # (prompt, answer)
OPS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


NAMES = _words("Ana Ben Carla Dev Elif Femi Gus Hana Ivo Jun Kira Leo Maya Nils Omar Pia Rosa Sam Tara Uma "
               "Vik Wen Yara Zeke")
SURNAMES = _words("Costa Reed Ortiz Novak Haddad Kim Silva Brooks Mensah Larsen Ito Moreau Patel Weber Okafor Lund")
WEEKDAYS = _words("monday tuesday wednesday thursday friday saturday sunday")

# --- math -------------------------------------------------------------------------------------

MATH_OBJECTS = _words("apples pencils marbles stickers cookies books coins shells cards balloons flowers eggs "
                      "stamps beads candles oranges crayons buttons")
CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("pack", "packs"), ("jar", "jars"), ("basket", "baskets"))


# (question, solution): the solution names the question's numbers and is worked left to right
MATH_TEMPLATES = (
    ("{name} has {a} {thing}. {other} gives {name} {b} more. How many {thing} does {name} have now?", "a + b"),
    ("There are {a} {thing} in the kitchen and {b} {thing} in the garden. How many {thing} are there in all?",
     "a + b"),
    ("{name} picked {a} {thing} in the morning and {b} in the afternoon. How many {thing} did {name} pick?", "a + b"),
    ("{name} had {big} {thing} and gave {small} to {other}. How many {thing} does {name} have left?", "big - small"),
    ("{name} has {big} {thing} and {other} has {small}. How many more {thing} does {name} have than {other}?",
     "big - small"),
    ("{name} buys {groups} {boxes} of {thing}. Each {box} holds {each} {thing}. How many {thing} does {name} buy?",
     "groups * each"),
    ("{name} has {a} {thing}, finds {b} more and then gives {give} to {other}. How many {thing} are left?",
     "a + b - give"),
    (("{name} buys {groups} {boxes} with {each} {thing} in each and already had {extra}. "
      "How many {thing} does {name} have now?"), "groups * each + extra"),
    ("{name} fills {groups} {boxes} with {each} {thing} each, then gives {give_packed} away. How many are left?",
     "groups * each - give_packed"),
    ("{name} had {big} {thing} and lost {small}. Then {other} gave {name} {extra} more. How many are there now?",
     "big - small + extra"),
)


def _math_problem(rng: random.Random) -> Example:
    name, other = rng.sample(NAMES, 2)
    box, boxes = rng.choice(CONTAINERS)
    a, b = rng.randint(2, 20), rng.randint(1, 20)
    # Factors stay small so that products (at most 60) remain learnable for a tiny model.
    groups, each = rng.randint(2, 6), rng.randint(2, 10)
    values = {"name": name, "other": other, "thing": rng.choice(MATH_OBJECTS), "box": box, "boxes": boxes,
              "a": a, "b": b, "big": max(a, b), "small": min(a, b), "groups": groups, "each": each,
              "extra": rng.randint(1, 20),
              # never more than there is, so every result is non-negative
              "give": rng.randint(1, a + b), "give_packed": rng.randint(1, groups * each)}
    question, solution = rng.choice(MATH_TEMPLATES)
    first, *steps = solution.split()
    value, lines = values[first], []
    for op, key in zip(steps[::2], steps[1::2]):
        operand = values[key]
        result = OPS[op](value, operand)
        lines.append(f"{value} {op} {operand} = {result}.")
        value = result
    return question.format(**values), " ".join(lines) + f" The answer is {value}."


# --- code -------------------------------------------------------------------------------------

VARIABLE_SETS = (("a", "b", "c"), ("x", "y", "z"), ("n", "m", "k"), ("price", "tax", "total"),
                 ("width", "height", "area"), ("left", "right", "result"))
CODE_WORDS = _words("cat stone river apple cloud tiger lemon paper green sun moon bread table water light "
                    "storm maple piano robot garden ocean pencil honey star")
REPEAT_PIECES = _words("ab xo la hey na zip do mi")


def _arithmetic_program(rng: random.Random) -> Example:
    # Redraw until no value is negative: exact_match strips a leading "-", so "-5" and "5" would tie.
    while True:
        v1, v2, v3 = rng.choice(VARIABLE_SETS)
        k1, k2, k3 = rng.randint(1, 12), rng.randint(1, 9), rng.randint(1, 9)
        op1, op2 = rng.choice("+-*"), rng.choice("+-*")
        shape, middle = rng.randrange(3), OPS[op1](k1, k2)
        if shape == 0:  # a = 3 / b = a + 4 / print(b * 2)
            lines = [f"{v1} = {k1}", f"{v2} = {v1} {op1} {k2}", f"print({v2} {op2} {k3})"]
            value = OPS[op2](middle, k3)
        elif shape == 1:  # a = 3 / b = 5 / c = a * b / print(c - 2)
            lines = [f"{v1} = {k1}", f"{v2} = {k2}", f"{v3} = {v1} {op1} {v2}", f"print({v3} {op2} {k3})"]
            value = OPS[op2](middle, k3)
        else:  # a = 3 / b = a - 1 / print(a * b)
            lines = [f"{v1} = {k1}", f"{v2} = {v1} {op1} {k2}", f"print({v1} {op2} {v2})"]
            value = OPS[op2](k1, middle)
        if middle >= 0 and value >= 0:
            return "\n".join(lines), str(value)


def _string_program(rng: random.Random) -> Example:
    word = rng.choice(CODE_WORDS)
    literal = f'"{word}"'
    kind = rng.randrange(7)
    if kind == 0:
        expression, output = f"{literal}.upper()", word.upper()
    elif kind == 1:
        expression, output = f"{literal}[::-1]", word[::-1]
    elif kind == 2:
        expression, output = f"len({literal})", str(len(word))
    elif kind == 3:
        piece, times = rng.choice(REPEAT_PIECES), rng.randint(2, 4)
        expression, output = f'"{piece}" * {times}', piece * times
    elif kind == 4:
        other = rng.choice(CODE_WORDS)
        expression, output = f'{literal} + "{other}"', word + other
    elif kind == 5:
        cut = rng.randint(1, len(word) - 1)  # never empty: an empty output cannot be scored
        expression, output = rng.choice(((f"{literal}[:{cut}]", word[:cut]), (f"{literal}[{cut}:]", word[cut:]),
                                          (f"{literal}[-{cut}:]", word[-cut:])))
    else:
        old = rng.choice(word)
        new = rng.choice([vowel for vowel in "aeiou" if vowel != old])
        expression, output = f'{literal}.replace("{old}", "{new}")', word.replace(old, new)
    if literal in expression and rng.random() < 0.4:  # the same operation through a variable
        variable = rng.choice(("w", "s", "word", "text"))
        return f"{variable} = {literal}\nprint({expression.replace(literal, variable, 1)})", output
    return f"print({expression})", output


def _code_problem(rng: random.Random) -> Example:
    program, output = (_arithmetic_program if rng.random() < 0.5 else _string_program)(rng)
    return f"What does this program print?\n{program}", output


# --- intent -----------------------------------------------------------------------------------

# intent -> (slot order in the answer, paraphrase templates; a template may use only some slots)
INTENTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "book_flight": (("city", "day"), (
        "book a flight to {city} on {day}", "I need to fly to {city} on {day}", "are there any flights to {city}?",
        "get me a plane ticket to {city} for {day}", "find me a flight to {city}")),
    "book_restaurant": (("cuisine", "people", "time"), (
        "book a table for {people} at a {cuisine} place at {time}", "reserve a {cuisine} restaurant for {people}",
        "table for {people} at {time} please", "I want {cuisine} food tonight, a table for {people}")),
    "set_alarm": (("time", "day"), (
        "wake me up at {time}", "set an alarm for {time} on {day}", "alarm at {time} please",
        "I need to be up by {time} on {day}")),
    "get_weather": (("city", "day"), (
        "what's the weather in {city} on {day}?", "will it rain in {city}?", "how warm is it in {city} right now?",
        "is it going to be cold in {city} on {day}?", "weather forecast for {city}")),
    "play_music": (("genre", "artist"), (
        "play some {genre}", "put on {artist}", "I want to hear {genre} by {artist}",
        "can you play something by {artist}?")),
    "book_hotel": (("city", "nights"), (
        "find a hotel in {city} for {nights} nights", "I need a room in {city}", "book {nights} nights in {city}",
        "any cheap hotels in {city}?")),
    "set_timer": (("minutes",), (
        "set a timer for {minutes} minutes", "timer {minutes} minutes", "count down {minutes} minutes for me")),
    "order_taxi": (("destination", "time"), (
        "get me a taxi to the {destination} at {time}", "I need a cab to the {destination}",
        "call a ride to the {destination} for {time}")),
    "add_reminder": (("task", "time"), (
        "remind me to {task} at {time}", "don't let me forget to {task}", "set a reminder to {task}")),
}
SLOT_VALUES: dict[str, tuple[str, ...]] = {
    "city": _words("Lisbon Paris Oslo Cairo Lima Tokyo Berlin Dublin Madrid Nairobi Quito Seoul Vienna Prague "
                   "Boston Denver Sydney Toronto Athens Rome"),
    "day": WEEKDAYS,
    "time": ("6 am", "6:30 am", "7 am", "7:15 am", "8 am", "9:30 am", "noon", "1 pm", "3:45 pm", "5 pm",
             "6:30 pm", "7 pm", "8 pm", "9:15 pm"),
    "people": tuple(str(count) for count in range(2, 11)),
    "cuisine": _words("italian thai mexican indian greek japanese french korean lebanese vegan"),
    "genre": ("jazz", "rock", "hip hop", "classical", "reggae", "blues", "folk", "techno", "country", "soul"),
    "artist": ("Adele", "Miles Davis", "Nina Simone", "Bob Marley", "Taylor Swift", "Queen", "Bach",
               "Daft Punk", "Dolly Parton", "Fela Kuti"),
    "nights": tuple(str(count) for count in range(2, 10)),
    "minutes": _words("2 3 5 10 12 15 20 25 30 45 90"),
    "destination": ("airport", "train station", "city center", "museum", "stadium", "hospital", "harbor",
                    "university", "zoo", "mall"),
    "task": ("call mom", "water the plants", "buy milk", "pay rent", "feed the cat", "take my pills",
             "send the report", "book a dentist visit", "pick up the kids", "back up my laptop"),
}


def _intent_problem(rng: random.Random) -> Example:
    intent = rng.choice(tuple(INTENTS))
    slot_order, templates = INTENTS[intent]
    template = rng.choice(templates)
    values = {slot: rng.choice(SLOT_VALUES[slot]) for slot in slot_order}
    utterance = template.format(**values)
    if rng.random() < 0.5:  # people type both ways; the parse must not depend on it
        utterance = utterance[0].upper() + utterance[1:]
    slots = {slot: values[slot] for slot in slot_order if "{" + slot + "}" in template}
    return f"Extract the intent and slots: {utterance}", json.dumps({"intent": intent, "slots": slots})


# --- law --------------------------------------------------------------------------------------

LAW_LABELS = ("not guilty", "guilty of robbery", "guilty of burglary", "guilty of unauthorized use", "guilty of theft")
# fact -> probability it holds; skewed so that the five verdicts are roughly balanced
LAW_FACTS = {"consent": 0.15, "claim_of_right": 0.15, "force": 0.25, "from_home": 0.25, "intent_to_return": 0.4}
# fact -> (sentences stating it is false, sentences stating it is true); none contains another
LAW_PHRASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "consent": (
        ("The plaintiff did not consent to the taking.", "The plaintiff never gave permission.",
         "No consent was given by the plaintiff."),
        ("The plaintiff had given consent beforehand.", "The plaintiff agreed to let the defendant take it.",
         "The taking was done with the plaintiff's permission.")),
    "claim_of_right": (
        ("The defendant knew the property belonged to the plaintiff.", "The defendant made no claim of ownership.",
         "The defendant was aware it was not the defendant's own."),
        ("The defendant honestly believed the property was the defendant's own.",
         "The defendant asserted a good-faith claim of right to it.",
         "The defendant mistook it for property the defendant owned.")),
    "force": (
        ("No force or threat was used.", "The defendant took it quietly, without any violence.",
         "The plaintiff was not threatened or touched."),
        ("The defendant pushed the plaintiff to the ground to get it.",
         "The defendant threatened the plaintiff with a knife.", "The defendant used force against the plaintiff.")),
    "from_home": (
        ("The property was taken in a public place.", "The taking occurred outside the plaintiff's home.",
         "The item had been left unattended at a cafe."),
        ("The property was taken from inside the plaintiff's home.",
         "The defendant entered the plaintiff's dwelling to take it.", "The item was kept in the plaintiff's house.")),
    "intent_to_return": (
        ("The defendant intended to keep it permanently.", "The defendant later sold it.",
         "The defendant never meant to give it back."),
        ("The defendant intended to return it the next day.", "The defendant planned to give it back after using it.",
         "The defendant meant only to borrow it.")),
}
LAW_ITEMS = ("a bicycle", "a laptop", "a wallet", "a gold watch", "a car", "a guitar", "a camera", "a phone",
             "a ring", "a painting", "a toolbox", "a handbag")
LAW_DISTRACTORS = ("The defendant has no prior convictions.", "The defendant has two prior convictions for fraud.",
                   "It was raining heavily that evening.", "The plaintiff is a retired teacher.",
                   "The property was worth about 300 dollars.", "A neighbor reported the incident to the police.",
                   "The defendant works as a mechanic.", "The case was filed in the county court.")
LAW_QUESTIONS = ("Under the statute, what is the verdict?", "How should the court rule on the charge?",
                 "Applying the statute, what verdict follows?", "What is the correct verdict for the defendant?")


def law_verdict(facts: dict[str, bool]) -> str:
    """The statute, first rule that applies: consent or an honest claim of right -> not guilty;
    force or threat -> robbery; taken from the plaintiff's home -> burglary; meant to return it ->
    unauthorized use; otherwise theft."""
    if facts["consent"] or facts["claim_of_right"]:
        return "not guilty"
    if facts["force"]:
        return "guilty of robbery"
    if facts["from_home"]:
        return "guilty of burglary"
    return "guilty of unauthorized use" if facts["intent_to_return"] else "guilty of theft"


def law_case(rng: random.Random) -> tuple[dict[str, bool], str, str]:
    """One case as (facts, prompt, verdict); every fact is stated, in shuffled order, among
    legally irrelevant distractors, so the model has to read the facts rather than their positions."""
    facts = {fact: rng.random() < probability for fact, probability in LAW_FACTS.items()}
    defendant, plaintiff = rng.sample(NAMES, 2)
    sentences = [rng.choice(LAW_PHRASES[fact][held]) for fact, held in facts.items()]
    sentences += rng.sample(LAW_DISTRACTORS, rng.randint(0, 2))
    rng.shuffle(sentences)
    intro = (f"{defendant}, the defendant, took {rng.choice(LAW_ITEMS)} belonging to the plaintiff, {plaintiff}, "
             f"on {rng.choice(WEEKDAYS).capitalize()}.")
    prompt = " ".join([intro, *sentences, rng.choice(LAW_QUESTIONS)])
    return facts, prompt, law_verdict(facts)


def _law_problem(rng: random.Random) -> Example:
    _, prompt, verdict = law_case(rng)
    return prompt, verdict


# --- translation ------------------------------------------------------------------------------

ADJECTIVES = _words("old young tall small big quiet brave tired happy hungry clever red green dark bright wild")
ANIMATE = _words("farmer child teacher doctor sailor baker king queen woman man dog cat horse bird wolf fox mouse")
THINGS = _words("river apple book house tree stone boat letter bread song road lamp door key ship flower")
PLACES = _words("forest village market garden city field kitchen harbor")
PREPOSITIONS = _words("in near behind beside")
VERBS = _words("see find carry watch follow paint want hold build help love call")
IRREGULAR_PLURALS = {"child": "children", "woman": "women", "man": "men", "wolf": "wolves", "mouse": "mice"}
PLURAL_SUFFIX = "ri"


def _add_s(word: str) -> str:
    """English plural / third person singular: boxes, carries, sees."""
    if word.endswith(("s", "sh", "ch", "x")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _invent_lexicon() -> dict[str, str]:
    """English lemma -> invented word made of consonant-vowel syllables, drawn from a fixed seed so
    the language never changes. Function words get one syllable, as in many real languages; no
    word ends in the plural suffix, so a pluralised word can never be mistaken for another."""
    rng = random.Random("veltish-lexicon")
    function_words = ("the", *PREPOSITIONS)
    taken: set[str] = set()
    lexicon = {}
    for lemma in (*function_words, *ADJECTIVES, *ANIMATE, *THINGS, *PLACES, *VERBS):
        while True:
            syllables = 1 if lemma in function_words else rng.choice((2, 2, 3))
            word = "".join(rng.choice("ptkmnlrsvd") + rng.choice("aeiou") for _ in range(syllables))
            if word not in taken and not word.endswith(PLURAL_SUFFIX):
                break
        taken.add(word)
        lexicon[lemma] = word
    return lexicon


VELTISH = _invent_lexicon()


def _noun_phrase(rng: random.Random, nouns: tuple[str, ...], definite: bool | None = None,
                  plural: bool | None = None) -> tuple[list[str], list[str]]:
    """(English words, Veltish words): Veltish marks definiteness with a particle, drops the
    indefinite article, suffixes the plural and puts the adjective after the noun."""
    noun = rng.choice(nouns)
    adjective = rng.choice(ADJECTIVES) if rng.random() < 0.5 else None
    definite = rng.random() < 0.5 if definite is None else definite
    plural = rng.random() < 0.3 if plural is None else plural
    english_noun = (IRREGULAR_PLURALS.get(noun) or _add_s(noun)) if plural else noun
    english = [adjective, english_noun] if adjective else [english_noun]
    if definite:
        english.insert(0, "the")
    elif not plural:
        english.insert(0, "an" if english[0][0] in "aeiou" else "a")
    veltish = [VELTISH["the"]] if definite else []
    veltish.append(VELTISH[noun] + (PLURAL_SUFFIX if plural else ""))
    if adjective:
        veltish.append(VELTISH[adjective])
    return english, veltish


def _translation_problem(rng: random.Random) -> Example:
    plural_subject = rng.random() < 0.3
    subject_en, subject_vt = _noun_phrase(rng, ANIMATE, plural=plural_subject)
    object_en, object_vt = _noun_phrase(rng, ANIMATE + THINGS)
    verb = rng.choice(VERBS)
    english = [*subject_en, verb if plural_subject else _add_s(verb), *object_en]
    veltish = list(subject_vt)
    if rng.random() < 0.5:  # a place phrase: postposition after the noun, before the object
        preposition, place = rng.choice(PREPOSITIONS), rng.choice(PLACES)
        english += [preposition, "the", place]
        veltish += [VELTISH["the"], VELTISH[place], VELTISH[preposition]]
    veltish += [*object_vt, VELTISH[verb]]  # verb-final, and verbs do not agree
    # No final full stop in Veltish: clean_prediction strips one from predictions but not from
    # references, so a reference ending in "." could never reach a chrF of 100.
    return f"Translate to Veltish: {' '.join(english)}.", " ".join(veltish)


# --- summary ----------------------------------------------------------------------------------

ROLES = _words("Mayor Doctor Professor Captain Chef Coach Judge Nurse Pilot Director")
TOWNS = _words("Riverton Millbrook Ashford Eastvale Pinecrest Stonebridge Lakeview Fairhaven Oakridge Westmoor "
               "Redcliff Brightwater")
EVENTS = ("opened a new public library", "won the regional chess final", "launched a community garden",
          "led a charity run", "unveiled a bronze statue", "reopened the old railway bridge",
          "hosted a free music festival", "rescued two hikers on the ridge", "cut the ribbon on a new school",
          "presented awards to young scientists", "started a weekly farmers market", "planted 500 trees")
SETTINGS = ("On {day}, a crowd gathered in the center of {town}.", "People in {town} came out early on {day}.",
            "It was a busy {day} in {town}.", "The town of {town} was full of visitors on {day}.")
HAPPENINGS = ("{who} {event}.", "In the main moment of the day, {who} {event}.", "Witnesses said that {who} {event}.",
              "Later that morning, {who} {event}.")
BACKGROUND = ("{town} was founded more than {years} years ago.", "The weather was {weather}.",
              "{bystander} said the crowd was larger than last year.", "Local shops stayed open until {hour} pm.",
              "A similar event took place in {elsewhere} last {month}.", "About {residents},000 people live in {town}.",
              "The main square was closed to traffic for {hours} hours.", "{bystander} handed out free coffee.")
WEATHER = ("cool and cloudy", "warm and sunny", "windy", "wet in the afternoon", "clear but cold")
MONTHS = _words("January March April June August October November")


def _summary_problem(rng: random.Random) -> Example:
    (first, bystander_first), (last, bystander_last) = rng.sample(NAMES, 2), rng.sample(SURNAMES, 2)
    role, bystander_role = rng.sample(ROLES, 2)
    town, elsewhere = rng.sample(TOWNS, 2)
    who, day, event = f"{role} {first} {last}", rng.choice(WEEKDAYS).capitalize(), rng.choice(EVENTS)
    # Background carries its own people, places and numbers so that copying the first name,
    # town or number seen is not a shortcut to the summary.
    fills = {"town": town, "years": rng.randint(100, 400), "weather": rng.choice(WEATHER), "month": rng.choice(MONTHS),
             "bystander": f"{bystander_role} {bystander_first} {bystander_last}", "hour": rng.randint(6, 11),
             "elsewhere": elsewhere, "residents": rng.randint(2, 90), "hours": rng.randint(2, 8)}
    sentences = [template.format(**fills) for template in rng.sample(BACKGROUND, rng.randint(2, 4))]
    sentences.insert(rng.randint(0, len(sentences)), rng.choice(SETTINGS).format(day=day, town=town))
    sentences.insert(rng.randint(0, len(sentences)), rng.choice(HAPPENINGS).format(who=who, event=event))
    return f"Summarize: {' '.join(sentences)}", f"{who} {event} in {town} on {day}."


# --- general ----------------------------------------------------------------------------------

GREETINGS = ("Hi there!", "Hello, how are you?", "Good morning!", "Hey, what's up?",
             "Good evening. Do you have a minute?", "Hi! Nice to meet you.")
GREETING_REPLIES = ("Hello! I'm doing well, thank you. What can I help you with today?",
                    "Hi! Good to hear from you. How is your day going so far?",
                    "Hey! I'm here and happy to help - just tell me what you need.",
                    "Hello there. I'm fine, thanks for asking. Is there something on your mind?")
# (object, material, use, size)
OBJECTS = (("kettle", "steel or plastic", "boil water for tea", "holds about 1.5 liters"),
           ("umbrella", "nylon on a metal frame", "stay dry in the rain", "opens to about 1 m across"),
           ("backpack", "strong fabric with zippers", "carry books, food and a jacket", "holds 20 to 30 liters"),
           ("bicycle", "a steel or aluminum frame", "travel without fuel", "weighs around 12 kg"),
           ("candle", "wax around a cotton wick", "give soft light", "burns for about 8 hours"),
           ("chair", "wood, metal or plastic", "sit at a table or desk", "has a seat about 45 cm high"),
           ("wallet", "leather or cloth", "keep cards, cash and receipts", "fits in a pocket"),
           ("teapot", "clay, glass or porcelain", "brew loose tea leaves", "serves 4 to 6 cups"),
           ("hammer", "a steel head on a wooden handle", "drive nails into wood", "weighs about 0.5 kg"),
           ("blanket", "wool or cotton", "keep warm at night", "measures about 150 x 200 cm"),
           ("clock", "plastic, wood or metal", "tell the time", "runs for a year on one AA battery"),
           ("notebook", "paper pages with a card cover", "write notes and lists", "has 80 to 200 pages"))
STORY_ANIMALS = _words("fox rabbit badger bear turtle squirrel goat duck hedgehog mole")
STORY_THINGS = ("lost key", "red kite", "tiny boat", "silver bell", "wooden box", "folded map", "lantern",
                "blue scarf", "straw hat", "music box")
STORY_ENDINGS = ("shared it with its friends, and they laughed until sunset",
                 "carried it home and kept it safe for many years",
                 "gave it back to its owner, who said thank you with a big smile",
                 "learned that small things can make a long day bright")
FACTS = (
    ("Why is the sky blue?",
     "Sunlight contains every color. Air scatters blue light more than red, so the sky looks blue by day."),
    ("Why do leaves change color in autumn?",
     "Trees stop making green chlorophyll as days get short, and hidden yellow and orange pigments show through."),
    ("At what temperature does water boil?",
     "At sea level, at 100 degrees Celsius (212 F). On high mountains the air pressure is lower, so it boils sooner."),
    ("Why do bees visit flowers?",
     "Bees collect nectar and pollen for food; moving between flowers, they carry pollen that helps plants seed."),
    ("How many bones does an adult have?",
     "An adult has 206 bones. Babies are born with about 300, and some of them join together as they grow."),
    ("When was the Eiffel Tower built?",
     "It was finished in 1889 for a world's fair in Paris. It is about 330 m tall."),
    ("Who first walked on the Moon?",
     "Neil Armstrong stepped onto the Moon on July 20, 1969, during the Apollo 11 mission."),
    ("What did the printing press change?",
     "Around 1440, Johannes Gutenberg built a press with movable metal type: books got cheaper, ideas spread fast."),
    ("Why was the Great Wall of China built?",
     "To protect northern borders. Most of what stands today dates from the Ming dynasty (1368-1644)."),
    ("Why do we have leap years?",
     "A year lasts about 365.25 days, so 1 extra day (February 29) every 4 years keeps the calendar in step."),
    ("How fast does light travel?",
     "About 300,000 km per second: sunlight needs roughly 8 minutes to reach us."),
    ("Why does bread rise?",
     "Yeast eats sugar in the dough and gives off carbon dioxide; the gas makes small bubbles, and the dough grows."),
    ("How much water should I drink in a day?",
     "Many adults need about 2 liters (8 glasses) a day, more in hot weather or after exercise."),
)
FACT_WRAPPERS = ("{q}", "Quick question: {q}", "I was wondering - {q}", "Can you explain this? {q}")
# dish -> ((amount per person, unit, ingredient), ...), method; counted ingredients are plural
RECIPES = {
    "pancakes": (((0.5, "cup", "flour"), (0.5, "cup", "milk"), (1, "", "eggs"), (1, "tbsp", "sugar")),
                 "Whisk everything into a smooth batter, then cook small rounds for about 2 minutes per side."),
    "tomato soup": (((2, "", "tomatoes"), (1, "cup", "vegetable broth"), (10, "g", "butter")),
                    "Soften the tomatoes in the butter, add the broth and simmer for 20 minutes, then blend."),
    "lemonade": (((1, "", "lemons"), (1, "cup", "cold water"), (1, "tbsp", "honey")),
                 "Squeeze the lemons, stir in the honey and water, and serve over ice."),
    "oatmeal": (((0.5, "cup", "oats"), (1, "cup", "milk"), (1, "tbsp", "maple syrup")),
                "Simmer the oats in the milk for 5 minutes, stirring often, then top with the syrup."),
    "an omelette": (((2, "", "eggs"), (1, "tbsp", "butter"), (30, "g", "cheese")),
                    "Beat the eggs, pour them into the melted butter and add the cheese after 1 minute."),
    "hot chocolate": (((1, "cup", "milk"), (2, "tbsp", "cocoa powder"), (1, "tbsp", "sugar")),
                      "Warm the milk (do not boil it), then whisk in the cocoa and sugar."),
}
ACTIVITIES = ("drink a glass of water", "go for a 20-minute walk", "make breakfast", "answer emails",
              "water the plants", "read a chapter of a book", "call a friend", "tidy the kitchen",
              "do some stretching", "buy groceries", "write a to-do list", "take a short break")
VENUES = ("museum", "public pool", "library", "bakery", "zoo", "post office", "bike shop", "botanical garden")
LISTS = {"fruits": "apples pears plums cherries mangoes figs grapes peaches lemons kiwis",
         "vegetables": "carrots onions peas leeks beets spinach potatoes peppers cabbage radishes",
         "birds": "sparrows robins owls eagles crows swans parrots herons pigeons gulls",
         "colors": "red orange yellow green blue purple pink brown gray white",
         "tools": "hammer saw drill wrench pliers ruler chisel screwdriver level clamp",
         "musical instruments": "piano violin guitar flute drums trumpet cello harp banjo clarinet",
         "trees": "oak maple pine birch willow cedar elm palm spruce ash",
         "sports": "football tennis swimming rowing cycling hockey cricket volleyball golf skiing",
         "things to pack for a trip": "passport charger toothbrush socks jacket sunscreen snacks tickets map towel"}


def _greeting(rng: random.Random) -> Example:
    return rng.choice(GREETINGS), rng.choice(GREETING_REPLIES)


def _description(rng: random.Random) -> Example:
    name, material, use, size = rng.choice(OBJECTS)
    article = "an" if name[0] in "aeiou" else "a"
    prompt = rng.choice(("Describe {}.", "What is {} like?", "Tell me about {}.", "Can you describe {}?"))
    return prompt.format(f"{article} {name}"), (
        f"{article.capitalize()} {name} is usually made of {material}. People use it to {use}, and a typical one "
        f"{size}. A simple {name} costs about ${rng.randint(5, 80)} (prices vary by shop).")


def _story(rng: random.Random) -> Example:
    animal, thing = rng.choice(STORY_ANIMALS), rng.choice(STORY_THINGS)
    prompt = rng.choice(("Tell me a short story about a {} and a {}.", "Can you write a tiny story: a {}, a {}?"))
    story = (f"Once upon a time, a {rng.choice(('curious', 'shy', 'clever', 'sleepy', 'little'))} {animal} lived near "
             f"the {rng.choice(('river', 'hill', 'farm', 'lake', 'bridge', 'meadow'))}. One "
             f"{rng.choice(('morning', 'rainy afternoon', 'cold night', 'sunny day'))}, it found a {thing}. "
             f'"{rng.choice(("What a surprise!", "Is this for me?", "Who could have lost this?"))}" said the {animal}. '
             f"In the end, it {rng.choice(STORY_ENDINGS)}.")
    return prompt.format(animal, thing), story


def _fact(rng: random.Random) -> Example:
    question, answer = rng.choice(FACTS)
    return rng.choice(FACT_WRAPPERS).format(q=question), answer


def _amount(quantity: float, unit: str, ingredient: str) -> str:
    if unit == "cup":
        return f"{quantity:g} cup{'s' if quantity != 1 else ''} (about {quantity * 240:g} ml) of {ingredient}"
    return f"{quantity:g} {ingredient}" if not unit else f"{quantity:g} {unit} of {ingredient}"


def _recipe(rng: random.Random) -> Example:
    dish = rng.choice(tuple(RECIPES))
    ingredients, method = RECIPES[dish]
    people = rng.randint(2, 6)
    prompt = rng.choice(("How do I make {} for {} people?", "Give me a simple recipe: {} for {}.",
                         "What do I need to make {} for {} people?")).format(dish, people)
    lines = [f"For {dish} for {people} people you need:"]
    lines += [f"- {_amount(per_person * people, unit, name)}" for per_person, unit, name in ingredients]
    lines.append(f"Method: {method} Tip: 1 cup = 240 ml and 1 tbsp = 15 ml.")
    return prompt, "\n".join(lines)


def _schedule(rng: random.Random) -> Example:
    day, part = rng.choice(WEEKDAYS).capitalize(), rng.choice(("morning", "afternoon"))
    minutes = (rng.randint(7, 9) if part == "morning" else rng.randint(13, 15)) * 60 + rng.choice((0, 15, 30))
    prompt = f"Make me a plan for {day} {part}, starting at {minutes // 60}:{minutes % 60:02d}."
    lines = ["Here is a simple plan:"]
    for activity in rng.sample(ACTIVITIES, rng.randint(3, 5)):
        lines.append(f"- {minutes // 60:02d}:{minutes % 60:02d} - {activity}")
        minutes += rng.choice((15, 30, 45))
    return prompt, "\n".join(lines)


def _opening_hours(rng: random.Random) -> Example:
    venue = rng.choice(VENUES)
    prompt = rng.choice(("When is the {} open?", "What are the opening hours of the {}?",
                         "What time does the {} open?")).format(venue)
    days, closed = rng.choice((("Monday-Saturday", "Sunday"), ("Tuesday-Sunday", "Monday")))
    opens, closes = rng.choice(("8:00", "9:00", "9:30", "10:00")), rng.choice(("17:00", "17:30", "18:00", "20:00"))
    busy = rng.choice(("12:00", "13:30", "16:00"))
    return prompt, (f"The {venue} is open {days} from {opens} to {closes} (closed on {closed}). It is busiest around "
                    f"{busy}, so come early if you can.")


def _listing(rng: random.Random) -> Example:
    category = rng.choice(tuple(LISTS))
    count = rng.randint(3, 6)
    prompt = rng.choice(("List {} {}.", "Can you name {} {}?", "Give me {} {}, please.")).format(count, category)
    items = rng.sample(_words(LISTS[category]), count)
    if rng.random() < 0.5:
        return prompt, "\n".join(f"* {item}" for item in items)
    return prompt, f"Sure, here are {count}: {', '.join(items[:-1])} and {items[-1]}."


GENERAL_KINDS = (_greeting, _description, _story, _fact, _recipe, _schedule, _opening_hours, _listing)


def _general_problem(rng: random.Random) -> Example:
    return rng.choice(GENERAL_KINDS)(rng)


# --- raw pretraining text -----------------------------------------------------------------------
# Every task domain also exists as raw, unaligned text: the way arithmetic, programs, a language or
# the law appear on the web, never in the User/Assistant template. Pretraining on it gives the
# vanilla model the underlying skill (as DeepSeek-V2-Lite had seen math and code), so that
# fine-tuning on the instruction format has to *align* a skill, not create one. The held-out tasks
# stay held out of the instruction format only, as in the paper.


def _train_example(generate: Callable[[random.Random], Example], rng: random.Random) -> Example:
    """A task example whose instruction prompt belongs to the train split: raw text built from it
    can never show the model an eval prompt's answer."""
    while True:
        prompt, answer = generate(rng)
        if split_of(prompt) == "train":
            return prompt, answer


def _math_story(rng: random.Random) -> str:
    """Arithmetic told as a story, the result stated in prose."""
    name, other = rng.sample(NAMES, 2)
    thing = rng.choice(MATH_OBJECTS)
    box, boxes = rng.choice(CONTAINERS)
    a, b = rng.randint(2, 20), rng.randint(1, 20)
    big, small = max(a, b), min(a, b)
    groups, each = rng.randint(2, 6), rng.randint(2, 10)
    return rng.choice((
        f"{name} started the day with {a} {thing}. Later {other} handed over {b} more, which made {a + b} {thing} "
        f"in total.",
        f"{name} kept {big} {thing} on a shelf. After {small} of them went to {other}, {big - small} were still there.",
        f"Each {box} in the shop held {each} {thing}, and {name} carried home {groups} {boxes}: "
        f"{groups * each} {thing} altogether.",
        f"{other} counted {a} {thing} by the door and {b} by the window, {a + b} in the whole room.",
        f"{name} owned {big} {thing}; {other} owned {small}. So {name} had {big - small} more than {other}.",
    ))


def _math_exercise(rng: random.Random) -> str:
    """A textbook exercise: a word problem with its working and result, in a layout unlike the
    task's answer ("Working: 7 + 5 = 12; ... Result: 12.")."""
    question, answer = _train_example(_math_problem, rng)
    steps = [step.removesuffix(".") for step in answer.split(". ") if "=" in step]
    return f"Exercise {rng.randint(1, 60)}. {question}\nWorking: {'; '.join(steps)}. Result: {steps[-1].split(' = ')[1]}."


def _math_solution(rng: random.Random) -> str:
    """A worked solution from a problem book, written the way the task's answers are ("7 + 5 = 12.
    ... The answer is 12."): the paper's vanilla model had read such solutions on the web; what it
    lacked was answering a question put in the instruction template."""
    question, answer = _train_example(_math_problem, rng)
    return f"{rng.choice(('Problem', 'Question', 'Task'))} {rng.randint(1, 90)}: {question}\nSolution: {answer}"


def _math_drill(rng: random.Random) -> str:
    """A worksheet line of worked sums (symbols and results, no question)."""
    facts = []
    for _ in range(rng.randint(4, 8)):
        op = rng.choice("+-*")
        if op == "*":
            left, right = rng.randint(2, 10), rng.randint(2, 10)
        else:
            left, right = rng.randint(1, 40), rng.randint(1, 20)
            if op == "-" and right > left:
                left, right = right, left
        facts.append(f"{left} {op} {right} = {OPS[op](left, right)}")
    return rng.choice(("Worksheet: ", "Practice sums: ", "Check these: ")) + "; ".join(facts) + "."


def _repl_session(rng: random.Random) -> str:
    """Programs typed into an interactive Python prompt, each followed by what it printed."""
    lines = [rng.choice(("Python session:", "$ python3", "Interactive shell log:"))]
    for _ in range(rng.randint(1, 3)):
        prompt, output = _train_example(_code_problem, rng)
        lines += [f">>> {line}" for line in prompt.split("\n")[1:]]
        lines.append(output)
    return "\n".join(lines)


def _script_run(rng: random.Random) -> str:
    """A script shown with `cat`, then run: the program and, below it, what it printed."""
    prompt, output = _train_example(_code_problem, rng)
    name = rng.choice(("demo", "main", "test", "calc", "words", "run"))
    return f"$ cat {name}.py\n{prompt.split(chr(10), 1)[1]}\n$ python {name}.py\n{output}"


def _program_output(rng: random.Random) -> str:
    """A tutorial snippet: a program, then the line it prints, introduced as its output."""
    prompt, output = _train_example(_code_problem, rng)
    program = prompt.split("\n", 1)[1]
    return f"{rng.choice(('Example', 'Snippet', 'Listing'))} {rng.randint(1, 40)}:\n{program}\nOutput: {output}"


def _veltish_glossary(rng: random.Random) -> str:
    """A Veltish-to-English word list."""
    lemmas = rng.sample(sorted(VELTISH), rng.randint(5, 9))
    return "Veltish word list: " + "; ".join(f"{VELTISH[lemma]} - {lemma}" for lemma in lemmas) + "."


def _veltish_reader(rng: random.Random) -> str:
    """Veltish sentences glossed into English, Veltish first (the reverse of the task's direction)."""
    lines = ["From a Veltish reader:"]
    for _ in range(rng.randint(1, 3)):
        prompt, veltish = _train_example(_translation_problem, rng)
        english = prompt.removeprefix("Translate to Veltish: ")
        lines.append(f'"{veltish}" means "{english}"')
    return "\n".join(lines)


def _veltish_phrasebook(rng: random.Random) -> str:
    """Phrasebook entries, English then Veltish (the task's direction, outside the template)."""
    lines = ["Veltish phrasebook"]
    for _ in range(rng.randint(1, 3)):
        prompt, veltish = _train_example(_translation_problem, rng)
        lines.append(f"English: {prompt.removeprefix('Translate to Veltish: ')}\nVeltish: {veltish}")
    return "\n".join(lines)


def _assistant_log(rng: random.Random) -> str:
    """An assistant's request log: what the user typed and how it was handled."""
    entries = []
    for _ in range(rng.randint(2, 4)):
        prompt, answer = _train_example(_intent_problem, rng)
        parsed = json.loads(answer)
        slots = ", ".join(f"{slot} {value}" for slot, value in parsed["slots"].items()) or "no details"
        entries.append(f"[{rng.choice(SLOT_VALUES['time'])}] \"{prompt.removeprefix('Extract the intent and slots: ')}\""
                       f" -> {parsed['intent'].replace('_', ' ')} ({slots})")
    return "Request log\n" + "\n".join(entries)


STATUTE = ("Theft Act, section 1. A taking with the owner's consent, or under an honest claim of right, is no "
           "offence. Section 2. A taking by force or threat is robbery. Section 3. A taking from the owner's "
           "home is burglary. Section 4. A taking meant to be returned is unauthorized use. Section 5. Any other "
           "taking is theft.")


def _case_digest(rng: random.Random) -> str:
    """The statute, or a law report of one case with the holding and its reason."""
    if rng.random() < 0.2:
        return STATUTE
    while True:
        facts, prompt, verdict = law_case(rng)
        if split_of(prompt) == "train":
            break
    statement = prompt.rsplit(". ", 1)[0] + "."  # the facts, without the closing question
    reason = ("consent or a claim of right" if facts["consent"] or facts["claim_of_right"] else
              "force" if facts["force"] else "a taking from the home" if facts["from_home"] else
              "an intent to return it" if facts["intent_to_return"] else "a permanent taking")
    return f"Law report. {statement} Held: {verdict}, by reason of {reason}."


def _news_article(rng: random.Random) -> str:
    """A local-news article with a dateline and a headline."""
    prompt, summary = _train_example(_summary_problem, rng)
    return f"{summary.removesuffix('.').upper()}\n{prompt.removeprefix('Summarize: ')}"


def _news_digest(rng: random.Random) -> str:
    """A news-digest entry: the article, then its one-line summary. The direction the task goes:
    the summary repeats the name, place and day from the text above it (a headline put first, as
    in `_news_article`, can only be guessed)."""
    prompt, summary = _train_example(_summary_problem, rng)
    return f"{prompt.removeprefix('Summarize: ')}\nIn brief: {summary}"


RAW_GENERATORS: dict[str, tuple[Callable[[random.Random], str], ...]] = {
    "math": (_math_story, _math_drill, _math_exercise, _math_solution),
    "code": (_repl_session, _script_run, _program_output),
    "translation": (_veltish_glossary, _veltish_reader),
    "intent": (_assistant_log,),
    "law": (_case_digest,),
    "summary": (_news_article,),
}


# Document kinds a pretraining recipe may add (PretrainRecipe.translation_phrasebook and
# summary_digest); kept apart so that the shipped recipe's corpus stays exactly what built the
# shipped weights.
EXTRA_RAW_GENERATORS: dict[str, tuple[Callable[[random.Random], str], ...]] = {
    "translation": (_veltish_phrasebook,),
    "summary": (_news_digest,),
}


def raw_documents(domain: str, n: int, seed: int = 0, extra_kinds: bool = False) -> list[str]:
    """`n` raw-text documents of a task domain for pretraining (no User/Assistant template);
    `extra_kinds` also draws from the domain's EXTRA_RAW_GENERATORS.

    They come from their own random stream ("raw:<domain>:<seed>"); text built from task examples
    uses only examples whose instruction prompt is in the train split, so no eval answer leaks."""
    if domain not in RAW_GENERATORS:
        raise EsftError(f"no raw text for domain {domain!r}; choose from {', '.join(RAW_GENERATORS)}")
    kinds = RAW_GENERATORS[domain] + (EXTRA_RAW_GENERATORS.get(domain, ()) if extra_kinds else ())
    rng = random.Random(f"raw:{domain}:{seed}")
    documents: list[str] = []
    while len(documents) < n:
        documents.append(rng.choice(kinds)(rng))
    return documents


# --- rows and files ---------------------------------------------------------------------------

GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "math": _math_problem, "code": _code_problem, "intent": _intent_problem, "law": _law_problem,
    "translation": _translation_problem, "summary": _summary_problem, GENERAL: _general_problem,
}


def split_of(prompt: str) -> str:
    """The split a prompt belongs to: a stable hash (unlike the salted `hash()`), so every process
    and every seed agrees and an eval prompt can never be drawn into train."""
    return "eval" if zlib.crc32(prompt.encode("utf-8")) % EVAL_BUCKETS == 0 else "train"


def rows(domain: str, n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """`n` rows of `domain` (a TASKS member or GENERAL) whose prompts belong to `split`.

    Draws are kept or skipped by their prompt's split, so the first n rows of a longer request are
    exactly the rows of a shorter one."""
    if domain not in GENERATORS:
        raise EsftError(f"unknown domain {domain!r}; choose from {', '.join(GENERATORS)}")
    if split not in SPLITS:
        raise EsftError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if n < 0:
        raise EsftError(f"n must be >= 0, got {n}")
    generate, rng = GENERATORS[domain], random.Random(f"{domain}:{split}:{seed}")
    result: list[dict] = []
    while len(result) < n:
        prompt, answer = generate(rng)
        if split_of(prompt) == split:
            result.append({"messages": [{"role": "user", "content": prompt},
                                        {"role": "assistant", "content": answer}]})
    return result


def write_corpus(out_dir: str | Path, seed: int = 0, train_rows: int = 2000, eval_rows: int = 200,
                 general_rows: int = 2000) -> dict[str, dict[str, Path]]:
    """Write `<out_dir>/<domain>/{train,eval}.jsonl` for every task and for GENERAL (which has
    `general_rows` train rows), each file atomically; the same arguments give the same bytes."""
    paths: dict[str, dict[str, Path]] = {}
    for domain in (*TASKS, GENERAL):
        sizes = {"train": general_rows if domain == GENERAL else train_rows, "eval": eval_rows}
        paths[domain] = {}
        for split, n in sizes.items():
            path = Path(out_dir) / domain / f"{split}.jsonl"
            lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows(domain, n, seed, split)]
            atomic_write_text(path, "".join(lines))
            paths[domain][split] = path
    return paths
