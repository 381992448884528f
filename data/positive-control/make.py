"""Write the positive-control task set: short-answer prompts the project wrote itself, scored by exact match.

    python data/positive-control/make.py            # (re)writes train.jsonl and eval/*.json here

Five kinds (facts, word relations, small arithmetic), each split by item into three disjoint parts:

* ``eval/<kind>.json``: the evaluation split, in llm-jp-eval's preprocessed dataset format (instruction,
  output_length, metrics, few_shots, samples of input/output) as stage 06 reads it, with the gold answers;
* ``train.jsonl``: the training split, as a prompt set (``messages``) whose turns are exactly the chat turns stage 06
  asks an item of that kind with (``eval.chat_layout: turns``: the instruction as the system turn, the few-shots as
  user and assistant turns, the item's input as the last user turn). Its answers are written nowhere: the last
  assistant turn is a fixed placeholder (``PLACEHOLDER``), which the arms of the study (central, random, first)
  never train on (``train_answers()`` recomputes them in memory, only to score the arms' chosen targets after a
  run: bench/positive_control_targets.py);
* the few-shot examples, the same in both splits' prompts.

Everything is drawn from the lists below with a fixed seed, so the files are the same on every run. The lists are
this project's own (common facts, antonyms, irregular verbs; sums and differences of two-digit numbers).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository's selftrain, for the prompt layout of stage 06

from selftrain.evaluate.prompts import chat_turns  # noqa: E402

SEED = 20261207
TRAIN, EVAL, SHOTS = 60, 60, 2  # items per kind in each split; few-shot examples per kind
OUTPUT_LENGTH = 12  # new tokens per answer (the longest gold is a few tokens)
PLACEHOLDER = "(no reference answer: this set's answers are not used in training)"

CAPITALS = """
Afghanistan Kabul; Albania Tirana; Algeria Algiers; Andorra Andorra la Vella; Angola Luanda; Argentina Buenos Aires;
Armenia Yerevan; Australia Canberra; Austria Vienna; Azerbaijan Baku; Bahamas Nassau; Bahrain Manama;
Bangladesh Dhaka; Barbados Bridgetown; Belarus Minsk; Belgium Brussels; Belize Belmopan; Bhutan Thimphu;
Botswana Gaborone; Bulgaria Sofia; Cambodia Phnom Penh; 
Canada Ottawa; Chad N'Djamena; Chile Santiago; China Beijing; Croatia Zagreb;
Cuba Havana; Cyprus Nicosia; Czechia Prague; Denmark Copenhagen; Djibouti Djibouti; Dominican Republic Santo Domingo;
Ecuador Quito; Egypt Cairo; El Salvador San Salvador; Estonia Tallinn; Ethiopia Addis Ababa; Fiji Suva;
Finland Helsinki; France Paris; Gabon Libreville; Georgia Tbilisi; Germany Berlin; Ghana Accra; Greece Athens;
Guatemala Guatemala City; Guinea Conakry; Guyana Georgetown; Haiti Port-au-Prince; Honduras Tegucigalpa;
Hungary Budapest; Iceland Reykjavik; India New Delhi; Indonesia Jakarta; Iran Tehran; Iraq Baghdad; Ireland Dublin;
Italy Rome; Jamaica Kingston; Japan Tokyo; Jordan Amman; Kenya Nairobi;
Kuwait Kuwait City; Kyrgyzstan Bishkek; Laos Vientiane; Latvia Riga; Lebanon Beirut; Liberia Monrovia; Libya Tripoli;
Liechtenstein Vaduz; Lithuania Vilnius; Luxembourg Luxembourg; Madagascar Antananarivo; Malawi Lilongwe;
Malaysia Kuala Lumpur; Mali Bamako; Malta Valletta; Mauritania Nouakchott; Mexico Mexico City;
Monaco Monaco; Mongolia Ulaanbaatar; Montenegro Podgorica; Morocco Rabat; Mozambique Maputo;
Myanmar Naypyidaw; Namibia Windhoek; Nepal Kathmandu; Netherlands Amsterdam; New Zealand Wellington;
Nicaragua Managua; Niger Niamey; Nigeria Abuja; North Korea Pyongyang; North Macedonia Skopje; Norway Oslo;
Oman Muscat; Pakistan Islamabad; Panama Panama City; Peru Lima; Philippines Manila; Poland Warsaw;
Portugal Lisbon; Qatar Doha; Romania Bucharest; Russia Moscow; Rwanda Kigali; Saudi Arabia Riyadh; Senegal Dakar;
Serbia Belgrade; Singapore Singapore; Slovakia Bratislava; Slovenia Ljubljana; Somalia Mogadishu; South Korea Seoul;
Spain Madrid; Sudan Khartoum; Suriname Paramaribo; Sweden Stockholm; Switzerland Bern; Syria Damascus;
Taiwan Taipei; Tajikistan Dushanbe; Thailand Bangkok; Tunisia Tunis; Turkey Ankara;
Turkmenistan Ashgabat; Uganda Kampala; United Kingdom London; United States Washington;
Uruguay Montevideo; Uzbekistan Tashkent; Venezuela Caracas; Vietnam Hanoi; Zambia Lusaka;
Zimbabwe Harare
"""

ANTONYMS = """
hot cold; big small; up down; open closed; day night; fast slow; high low; long short; rich poor; happy sad; wet dry;
early late; full empty; strong weak; thick thin; wide narrow; deep shallow; loud quiet; push pull; buy sell;
win lose; true false; alive dead; love hate; above below; before after; inside outside; north south; east west;
left right; first last; top bottom; question answer; friend enemy; clean dirty; cheap expensive; safe dangerous;
ancient modern; accept reject; increase decrease; maximum minimum; positive negative; victory defeat; war peace;
male female; husband wife; king queen; boy girl; brother sister; son daughter; uncle aunt; summer winter;
sunrise sunset; entrance exit; import export; include exclude; internal external; visible invisible;
possible impossible; legal illegal; honest dishonest; agree disagree; appear disappear; like dislike; lock unlock;
always never; present absent; plus minus; odd even; tight loose; rough smooth; asleep awake; guilty innocent;
hero villain; employer employee; lend borrow; float sink; freeze melt; laugh cry; remember forget; ascend descend;
attack defend; success failure; profit loss; light dark; heavy light; fat thin; black white; good bad; yes no;
come go; give take; hard soft; sharp blunt; arrive depart; start finish; sweet sour; teacher student; parent child;
mother father; dawn dusk; inhale exhale; forward backward; upstairs downstairs; most least; more less;
many few; all none; everything nothing; together apart; near far; often seldom; noisy silent; wild tame;
brave cowardly; polite rude; generous selfish; kind cruel; calm angry; wise foolish; optimist pessimist;
input output; minor major; junior senior; rise fall; enter leave; raw cooked; clever stupid
"""

VERBS = """
arise arose; awake awoke; bear bore; beat beat; become became; begin began; bend bent; bet bet; bind bound;
bite bit; bleed bled; blow blew; break broke; breed bred; bring brought; build built; burst burst; buy bought;
cast cast; catch caught; choose chose; cling clung; come came; cost cost; creep crept; cut cut; deal dealt; dig dug;
do did; draw drew; drink drank; drive drove; eat ate; fall fell; feed fed; feel felt; fight fought; find found;
flee fled; fling flung; fly flew; forbid forbade; forget forgot; forgive forgave; freeze froze; get got; give gave;
go went; grind ground; grow grew; hang hung; have had; hear heard; hide hid; hit hit; hold held; hurt hurt;
keep kept; kneel knelt; know knew; lay laid; lead led; leave left; lend lent; let let; light lit; lose lost;
make made; mean meant; meet met; pay paid; put put; quit quit; read read; ride rode; ring rang; rise rose; run ran;
say said; see saw; seek sought; sell sold; send sent; set set; shake shook; shine shone; shoot shot; shrink shrank;
shut shut; sing sang; sink sank; sit sat; sleep slept; slide slid; sling slung; speak spoke; speed sped;
spend spent; spin spun; split split; spread spread; spring sprang; stand stood; steal stole; stick stuck;
sting stung; stink stank; strike struck; string strung; swear swore; sweep swept; swim swam; swing swung;
take took; teach taught; tear tore; tell told; think thought; throw threw; tread trod; understand understood;
wake woke; wear wore; weave wove; weep wept; win won; wind wound; write wrote; withdraw withdrew; undo undid;
overcome overcame; mislead misled; foresee foresaw; rebuild rebuilt; retell retold
"""


def _pairs(text: str, two_words: bool) -> list[tuple[str, str]]:
    """'Country Capital Name; ...' -> pairs. For capitals the country may be several words: the known countries of
    more than one word are listed, the rest of the entry is the capital."""
    out = []
    for entry in " ".join(text.split()).split(";"):
        words = entry.split()
        if not words:
            continue
        if two_words:
            out.append((words[0], words[1]))
            continue
        for k in (3, 2, 1):  # the longest country name that is a known multi-word one (else one word)
            head = " ".join(words[:k])
            if k == 1 or head in MULTI_WORD_COUNTRIES:
                out.append((head, " ".join(words[k:])))
                break
    return out


MULTI_WORD_COUNTRIES = {
    "Dominican Republic", "El Salvador", "New Zealand", "North Korea", "North Macedonia",
    "Saudi Arabia", "South Korea", "United Kingdom", "United States",
}  # fmt: skip


def _arithmetic(rng: random.Random, op: str, count: int) -> list[tuple[str, str]]:
    """Distinct two-digit sums (a + b) or differences (a - b, a > b), a and b in 10..89."""
    seen, out = set(), []
    while len(out) < count:
        a, b = rng.randint(10, 89), rng.randint(10, 89)
        if op == "-":
            a, b = max(a, b), min(a, b)
            if a == b:
                continue
        if (a, b) in seen:
            continue
        seen.add((a, b))
        out.append((f"{a} {op} {b}", str(a + b if op == "+" else a - b)))
    return out


KINDS = {
    # kind: (category, instruction, input template)
    "capitals": ("facts", "Name the capital city of the country. Reply with the city name only.", "Country: {}"),
    "antonyms": ("words", "Give the word with the opposite meaning. Reply with one word only.", "Word: {}"),
    "past_tense": ("words", "Give the simple past tense of the verb. Reply with one word only.", "Verb: {}"),
    "sums": ("arithmetic", "Add the two numbers. Reply with the result in digits only.", "{}"),
    "differences": ("arithmetic", "Subtract the second number from the first. Reply with the result in digits only.",
                    "{}"),
}  # fmt: skip


def items(kind: str, rng: random.Random) -> list[tuple[str, str]]:
    """Every (input value, answer) of a kind, shuffled with the kind's own draw."""
    need = SHOTS + TRAIN + EVAL
    if kind in ("sums", "differences"):
        return _arithmetic(rng, "+" if kind == "sums" else "-", need)
    pool = {"capitals": _pairs(CAPITALS, False), "antonyms": _pairs(ANTONYMS, True), "past_tense": _pairs(VERBS, True)}
    got = list(dict(pool[kind]).items())  # a word listed twice keeps one answer
    rng.shuffle(got)
    if len(got) < need:
        raise SystemExit(f"{kind}: {len(got)} items, {need} needed")
    return got[:need]


def splits() -> dict[str, tuple[list, list, list]]:
    """Per kind: (few-shot pairs, training pairs, evaluation pairs), drawn in KINDS' order from one seeded draw."""
    rng = random.Random(SEED)
    out = {}
    for kind in KINDS:
        got = items(kind, rng)
        out[kind] = (got[:SHOTS], got[SHOTS : SHOTS + TRAIN], got[SHOTS + TRAIN :])
    return out


def train_answers() -> dict[str, str]:
    """The training split's answers by prompt id. Written to no file and used by no arm of the study: only to check,
    after a run, how often each arm's chosen training target was right (bench/positive_control_targets.py)."""
    return {f"{kind}-{i:03d}": a for kind, (_, train, _) in splits().items() for i, (_, a) in enumerate(train)}


def build(out: Path) -> dict[str, int]:
    """Write eval/<kind>.json and train.jsonl under `out`; returns the counts."""
    train, counts = [], {}
    (out / "eval").mkdir(parents=True, exist_ok=True)
    for kind, (shot_pairs, train_items, eval_items) in splits().items():
        category, instruction, template = KINDS[kind]
        shots = [{"input": template.format(q), "output": a} for q, a in shot_pairs]
        data = {
            "instruction": instruction,
            "output_length": OUTPUT_LENGTH,
            "metrics": ["exact_match", "char_f1"],
            "few_shots": shots,
            "samples": [{"input": template.format(q), "output": a} for q, a in eval_items],
        }
        (out / "eval" / f"{kind}.json").write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n")
        for i, (q, _) in enumerate(train_items):
            turns = chat_turns(instruction, shots, template.format(q))
            train.append({
                "id": f"{kind}-{i:03d}", "category": category, "kind": kind,
                "messages": [*turns, {"role": "assistant", "content": PLACEHOLDER}],
            })  # fmt: skip
        counts[kind] = len(eval_items)
    random.Random(SEED + 1).shuffle(train)  # kinds interleaved: prompts.limit takes a bit of each
    (out / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train))
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE, help="folder to write (default: this script's)")
    args = ap.parse_args()
    counts = build(args.out)
    print(f"train.jsonl: {TRAIN * len(KINDS)} prompts; eval/: " + ", ".join(f"{k} {n}" for k, n in counts.items()))


if __name__ == "__main__":
    main()
