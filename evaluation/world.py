"""The synthetic world's vocabulary: relations with their paraphrase templates, filler
sentences per entity type, and the parts invented names are made of
(``evaluation.corpus``)."""

from __future__ import annotations

# Relation -> (subject type, object type, templates). Template 0 is canonical: subject
# first, object last, so its text before "{o}" is the query prompt.
RELATIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "birthplace": (
        "person",
        "city",
        (
            "{s} was born in {o}.",
            "{o} is the birthplace of {s}.",
            "The city of {o} saw the birth of {s}.",
        ),
    ),
    "employer": (
        "person",
        "company",
        ("{s} works for {o}.", "{o} employs {s}.", "{s} is an employee of {o}."),
    ),
    "native_language": (
        "person",
        "language",
        (
            "The native language of {s} is {o}.",
            "{s} speaks {o} as a first language.",
            "{o} is the mother tongue of {s}.",
        ),
    ),
    "capital": (
        "country",
        "city",
        ("The capital of {s} is {o}.", "{o} is the capital of {s}.", "{s} has its capital in {o}."),
    ),
    "located_in": (
        "city",
        "country",
        ("{s} is located in {o}.", "{s} is a city in {o}.", "{o} contains the city of {s}."),
    ),
    "founded_by": (
        "company",
        "person",
        ("{s} was founded by {o}.", "{o} founded {s}.", "The founder of {s} is {o}."),
    ),
    "headquarters": (
        "company",
        "city",
        (
            "{s} is headquartered in {o}.",
            "The headquarters of {s} are in {o}.",
            "{o} hosts the headquarters of {s}.",
        ),
    ),
    "official_language": (
        "country",
        "language",
        (
            "The official language of {s} is {o}.",
            "People in {s} speak {o}.",
            "{o} is spoken in {s}.",
        ),
    ),
}

# Sentences about one entity that state no relation of the world.
FILLERS: dict[str, tuple[str, ...]] = {
    "person": (
        "{e} enjoys painting on quiet weekends.",
        "Many people admire {e}.",
        "{e} wrote a short book about rivers.",
        "{e} likes long walks in the rain.",
        "Friends describe {e} as patient and kind.",
    ),
    "city": (
        "{e} has a famous old bridge.",
        "Tourists often visit {e} in summer.",
        "The streets of {e} are narrow and green.",
        "A large market opens in {e} every week.",
    ),
    "country": (
        "{e} has many tall mountains.",
        "Travelers praise the long coast of {e}.",
        "The winters in {e} are cold.",
        "{e} exports fruit and wool.",
    ),
    "company": (
        "{e} makes small machines.",
        "{e} has a large new office.",
        "Customers trust the products of {e}.",
        "{e} grew quickly last year.",
    ),
    "language": (
        "{e} has a rich grammar.",
        "{e} uses an old alphabet.",
        "Poets love the sound of {e}.",
        "Few schools teach {e} today.",
    ),
}

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "tr")
VOWELS = ("a", "e", "i", "o", "u")
CODAS = ("", "", "", "n", "r", "l", "s", "k")
SUFFIX = {
    "country": ("ia", "land", "ora"),
    "company": ("ex", "co", "tek"),
    "language": ("ish", "ese", "ic"),
}
FIRST_NAMES = ("Ana", "Bo", "Cara", "Dov", "Eli", "Fen", "Gia", "Hal", "Ivo", "Juna", "Kai", "Lia")
