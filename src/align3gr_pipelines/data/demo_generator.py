"""A seeded synthetic shop, so the main job needs no download.

Hidden structure the recommender can learn from:
- *content* (semantic signal): items live in departments → subcategories and have a style; their titles,
  descriptions, brands and categories are written from that, so related items read alike. A user's next item
  tends to be close in content to the last one (same subcategory, same style).
- *taste*: each user has latent preferences over departments, subcategories, styles and brands.
- *collaborative* signal, invisible in the text: every item belongs to a hidden co-consumption group that cuts
  across departments, users favour a few groups, and every item has a few "follow-up" items that people often
  take next (an item→item transition graph).
Ratings come from the same user–item affinity plus item quality and a per-user bias; reviews are written
from the rating. Profiles state an age band and some interests: consistent with, but not a copy of, taste.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .canonical import RawTables, item_text
from .errors import DataPrepError

# department → subcategory → (nouns, features, what it is for)
CATALOGUE: dict[str, dict[str, tuple[list[str], list[str], str]]] = {
    "Musical Instruments": {
        "Guitars": (
            ["acoustic guitar", "electric guitar", "classical guitar", "bass guitar"],
            ["solid spruce top", "rosewood fretboard", "humbucker pickups", "low, easy action", "warm, resonant tone"],
            "strumming chords, playing riffs and gigging",
        ),
        "Keyboards & Pianos": (
            ["digital piano", "synthesizer", "MIDI keyboard", "stage piano"],
            ["weighted hammer-action keys", "built-in speakers", "hundreds of instrument voices", "USB MIDI output"],
            "practising scales, composing and playing on stage",
        ),
        "Drums & Percussion": (
            ["drum kit", "snare drum", "cajon", "electronic drum pad"],
            ["mesh heads", "maple shells", "responsive sensors", "punchy attack", "quiet practice mode"],
            "keeping the beat in rehearsals and at home",
        ),
        "Recording & Audio": (
            ["condenser microphone", "audio interface", "pair of studio headphones", "studio monitor"],
            ["low-noise preamps", "flat frequency response", "24-bit converters", "closed-back isolation"],
            "home recording, podcasts and mixing",
        ),
    },
    "Outdoor & Camping": {
        "Tents & Shelters": (
            ["two-person tent", "family tent", "ultralight tarp", "bivy shelter"],
            ["waterproof rainfly", "aluminium poles", "quick pitch design", "mesh ventilation panels"],
            "weekend camping and backcountry trips",
        ),
        "Hiking Gear": (
            ["daypack", "pair of trekking poles", "hydration pack", "pair of hiking boots"],
            ["padded hip belt", "breathable back panel", "grippy rubber outsole", "adjustable carbon shafts"],
            "day hikes, long trails and mountain walks",
        ),
        "Camp Kitchen": (
            ["camping stove", "cook set", "insulated water bottle", "cooler box"],
            ["piezo ignition", "nesting pots", "double-wall insulation", "wind-resistant burner"],
            "cooking outdoors and keeping drinks cold at camp",
        ),
    },
    "Kitchen & Coffee": {
        "Coffee & Espresso": (
            ["espresso machine", "burr coffee grinder", "pour-over kettle", "French press"],
            ["15-bar pump", "conical steel burrs", "gooseneck spout", "precise temperature control"],
            "brewing espresso, lattes and filter coffee at home",
        ),
        "Cookware": (
            ["cast-iron skillet", "non-stick frying pan", "stainless saucepan", "Dutch oven"],
            ["even heat distribution", "oven-safe handle", "pre-seasoned surface", "induction-ready base"],
            "searing, braising and everyday cooking",
        ),
        "Baking": (
            ["stand mixer", "set of baking tins", "bread proofing basket", "digital kitchen scale"],
            ["planetary mixing action", "non-stick coating", "gram-accurate sensor", "natural rattan weave"],
            "baking bread, cakes and pastries",
        ),
    },
    "Fitness": {
        "Yoga & Pilates": (
            ["yoga mat", "set of yoga blocks", "pilates ring", "meditation cushion"],
            ["non-slip texture", "extra cushioning", "natural cork surface", "lightweight foam"],
            "stretching, yoga flows and mindful practice",
        ),
        "Strength Training": (
            ["set of adjustable dumbbells", "kettlebell", "resistance band set", "weight bench"],
            ["quick-change weight dial", "knurled grip", "steel frame", "progressive resistance levels"],
            "building strength with home workouts",
        ),
        "Running": (
            ["pair of running shoes", "GPS running watch", "running belt", "reflective running vest"],
            ["responsive foam midsole", "heart-rate sensor", "long battery life", "breathable mesh upper"],
            "daily runs, intervals and race training",
        ),
    },
    "Photography": {
        "Cameras": (
            ["mirrorless camera", "instant film camera", "action camera", "compact zoom camera"],
            ["fast autofocus", "large image sensor", "4K video recording", "in-body stabilisation"],
            "travel photos, portraits and video",
        ),
        "Lenses": (
            ["prime lens", "telephoto zoom lens", "wide-angle lens", "macro lens"],
            ["bright f/1.8 aperture", "silent focus motor", "sharp edge-to-edge detail", "weather sealing"],
            "portraits, wildlife and landscapes",
        ),
        "Lighting & Tripods": (
            ["travel tripod", "LED video light", "ring light", "camera gimbal"],
            ["carbon-fibre legs", "adjustable colour temperature", "three-axis stabilisation", "quick-release plate"],
            "steady shots, studio lighting and vlogging",
        ),
    },
    "Games & Hobbies": {
        "Board Games": (
            ["strategy board game", "cooperative board game", "party card game", "family board game"],
            ["beautifully illustrated cards", "quick setup", "deep replayability", "sturdy wooden pieces"],
            "game nights with friends and family",
        ),
        "Puzzles & Models": (
            ["1000-piece jigsaw puzzle", "wooden model kit", "3D metal puzzle", "model railway set"],
            ["precision laser-cut parts", "detailed instructions", "vivid printed artwork", "snug-fitting pieces"],
            "relaxing weekend building and puzzling",
        ),
        "Video Game Accessories": (
            ["wireless controller", "gaming headset", "mechanical keyboard", "gaming mouse"],
            ["low-latency wireless", "surround sound", "tactile switches", "adjustable DPI sensor"],
            "long gaming sessions and competitive play",
        ),
    },
}

# style → (title adjective, description sentence, how a profile says it)
STYLES: dict[str, tuple[str, str, str]] = {
    "budget": ("Essential", "An affordable, no-frills pick that covers the basics well.", "good value for money"),
    "premium": ("Pro", "Professional-grade build quality for demanding users.", "professional-grade equipment"),
    "compact": ("Compact", "Small, light and portable, easy to take anywhere.", "compact, portable gear"),
    "vintage": ("Heritage", "Classic retro styling inspired by timeless designs.", "classic, vintage-style designs"),
    "eco": ("Eco", "Made from recycled and sustainable materials.", "eco-friendly, sustainable products"),
}

BRANDS: list[tuple[str, list[str], str]] = [  # name, departments, signature style
    ("Aldermere", ["Musical Instruments"], "vintage"),
    ("Brightforge", ["Musical Instruments", "Video Game Accessories"], "premium"),
    ("Copperline", ["Musical Instruments"], "budget"),
    ("Kestrel", ["Musical Instruments", "Photography"], "compact"),
    ("Everpeak", ["Outdoor & Camping"], "premium"),
    ("Granite Ridge", ["Outdoor & Camping", "Fitness"], "budget"),
    ("Northwind", ["Outdoor & Camping"], "compact"),
    ("Fernleaf", ["Outdoor & Camping", "Kitchen & Coffee"], "eco"),
    ("Halcyon", ["Kitchen & Coffee"], "premium"),
    ("Oakhaven", ["Kitchen & Coffee"], "vintage"),
    ("Pinecrest", ["Kitchen & Coffee", "Games & Hobbies"], "budget"),
    ("Juniper Lane", ["Fitness"], "eco"),
    ("Vantage", ["Fitness", "Photography"], "premium"),
    ("Zephyr", ["Fitness"], "compact"),
    ("Lumen", ["Photography"], "premium"),
    ("Silverbirch", ["Photography"], "vintage"),
    ("Tidewater", ["Games & Hobbies"], "eco"),
    ("Quillon", ["Games & Hobbies"], "vintage"),
    ("Redfern", ["Games & Hobbies", "Musical Instruments"], "budget"),
]

AGE_BANDS = ["18-24", "25-34", "35-44", "45-54", "55+"]
# Older shoppers lean vintage/premium, younger ones budget/compact: profile and taste agree, loosely.
_AGE_STYLE = {"18-24": ["budget", "compact"], "25-34": ["compact", "eco"], "35-44": ["premium", "eco"],
              "45-54": ["premium", "vintage"], "55+": ["vintage", "premium"]}

REVIEWS: dict[int, list[str]] = {
    1: ["Terrible {noun}. The {feat} was nothing like described and it broke within a week; returned it.",
        "Poor quality {noun}, flimsy and disappointing. Would not recommend.",
        "Awful. This {noun} arrived defective and the {feat} never worked."],
    2: ["Disappointed with this {noun}. The {feat} is weaker than advertised.",
        "Not great. The {noun} works, but it feels cheap and the {feat} is poor.",
        "Below expectations for {use}; the {feat} is disappointing."],
    3: ["An okay {noun}. The {feat} is fine, nothing special.",
        "Average {noun} for {use}. Does the job, some rough edges.",
        "Decent but not outstanding; the {feat} is just okay."],
    4: ["Good {noun}. I like the {feat}, solid for {use}.",
        "Very nice {noun}, reliable and well made. Would recommend.",
        "Happy with it: the {feat} is good and it suits {use}."],
    5: ["Excellent {noun}! The {feat} is fantastic, perfect for {use}.",
        "Absolutely love this {noun}. Great build and the {feat} is superb.",
        "Best purchase this year: amazing {feat}, highly recommend for {use}."],
}

# Target share of 1..5 stars (roughly the shape of Amazon and MovieLens ratings).
RATING_SHARES = np.array([0.07, 0.10, 0.20, 0.33, 0.30])


def generate_demo(
    n_users: int = 1000,
    n_items: int = 500,
    mean_interactions: float = 18.0,
    seed: int = 42,
    n_groups: int = 24,
    n_followups: int = 4,
    start: int = 1_546_300_800,  # 2019-01-01
) -> RawTables:
    """Generate items, users (with profiles) and chronological interactions with ratings and reviews."""
    if n_users < 1 or n_items < 10:
        raise DataPrepError(
            f"parameters data_prep.demo.n_users >= 1 and n_items >= 10 expected, got {n_users}, {n_items}"
        )
    if not 3 <= mean_interactions <= n_items / 2:
        raise DataPrepError(
            "parameter data_prep.demo.mean_interactions must lie in [3, n_items/2], "
            f"got {mean_interactions} with n_items={n_items}"
        )
    rng = np.random.default_rng(seed)
    depts = list(CATALOGUE)
    subs = [(d, s) for d in depts for s in CATALOGUE[d]]
    styles = list(STYLES)
    n_sub, n_style, n_brand = len(subs), len(styles), len(BRANDS)

    # ---- items
    sub_weight = rng.dirichlet(np.full(n_sub, 5.0))
    item_sub = rng.choice(n_sub, size=n_items, p=sub_weight)
    item_sub[:n_sub] = np.arange(n_sub)[: min(n_sub, n_items)]  # every subcategory exists
    item_dept = np.array([depts.index(subs[s][0]) for s in item_sub])
    item_brand = np.empty(n_items, dtype=int)
    item_style = np.empty(n_items, dtype=int)
    for j in range(n_items):
        dept, sub = subs[item_sub[j]]
        ok = [b for b, (_, ds, _) in enumerate(BRANDS) if dept in ds or sub in ds]
        item_brand[j] = rng.choice(ok)
        sig = styles.index(BRANDS[item_brand[j]][2])
        item_style[j] = sig if rng.random() < 0.6 else rng.integers(n_style)
    item_quality = rng.normal(0.0, 0.6, n_items)
    item_logpop = -0.8 * np.log1p(rng.permutation(n_items)) / np.log(n_items) * 3  # Zipf-like popularity
    # Hidden co-consumption groups: half follow the department, half cut across (pure collaborative signal).
    item_group = np.where(rng.random(n_items) < 0.5, item_dept * (n_groups // len(depts)) + rng.integers(0, max(1, n_groups // len(depts)), n_items), rng.integers(0, n_groups, n_items)) % n_groups
    followups = np.empty((n_items, n_followups), dtype=int)
    for j in range(n_items):
        same = np.flatnonzero((item_group == item_group[j]) & (np.arange(n_items) != j))
        pool = same if len(same) >= n_followups else np.setdiff1d(np.arange(n_items), [j])
        followups[j] = rng.choice(pool, size=n_followups, replace=False)

    rows = []
    item_noun, item_feats = [], []
    for j in range(n_items):
        dept, sub = subs[item_sub[j]]
        nouns, feats, use = CATALOGUE[dept][sub]
        noun = nouns[rng.integers(len(nouns))]
        f1, f2 = rng.choice(len(feats), size=2, replace=False)
        brand = BRANDS[item_brand[j]][0]
        adj, style_sentence, _ = STYLES[styles[item_style[j]]]
        model = f"{''.join(w[0] for w in brand.split()).upper()}-{100 + j}"
        short = re.sub(r"^(pair|set) of ", "", noun)
        title = f"{brand} {adj} {' '.join(w if w[0].isupper() else w.capitalize() for w in short.split())} {model}"
        article = "An" if adj[0] in "AEIOU" else "A"
        desc = f"{article} {adj.lower()} {noun} with {feats[f1]} and {feats[f2]}. {style_sentence} Ideal for {use}."
        rows.append((f"i{j:05d}", title, desc, brand, f"{dept}, {sub}"))
        item_noun.append(noun)
        item_feats.append((feats[f1], use))
    items = pd.DataFrame(rows, columns=["item_id", "title", "description", "brand", "categories"])
    items["text"] = item_text(items)

    # ---- users: latent taste
    dept_pref = rng.dirichlet(np.full(len(depts), 0.35), n_users)
    sub_pref = np.stack([rng.dirichlet(np.full(n_sub, 0.6)) for _ in range(n_users)])
    age = rng.integers(len(AGE_BANDS), size=n_users)
    style_pref = rng.dirichlet(np.full(n_style, 0.5), n_users)
    for u in range(n_users):  # the age band nudges style taste
        for s in _AGE_STYLE[AGE_BANDS[age[u]]]:
            style_pref[u, styles.index(s)] += 0.25
    style_pref /= style_pref.sum(1, keepdims=True)
    brand_aff = rng.normal(0.0, 0.4, (n_users, n_brand))
    group_pref = rng.dirichlet(np.full(n_groups, 0.25), n_users)
    user_bias = rng.normal(0.0, 0.35, n_users)

    # Static user×item affinity: taste (department, subcategory, style, brand) + hidden groups + popularity.
    taste = (
        1.6 * np.log(dept_pref[:, item_dept] + 1e-3)
        + 0.8 * np.log(sub_pref[:, item_sub] * n_sub + 1e-2)
        + 1.2 * np.log(style_pref[:, item_style] * n_style + 1e-2)
        + brand_aff[:, item_brand]
    )
    collab = 1.5 * np.log(group_pref[:, item_group] * n_groups + 1e-2)
    static = taste + collab + item_logpop

    sigma = 0.6
    lengths = np.exp(rng.normal(np.log(mean_interactions) - sigma**2 / 2, sigma, n_users))
    lengths = np.clip(np.round(lengths), 2, min(n_items - 1, int(4 * mean_interactions))).astype(int)

    inter_rows = []
    users_rows = []
    for u in tqdm(range(n_users), desc="demo users", leave=False):
        seen = np.zeros(n_items, dtype=bool)
        t = start + int(rng.integers(0, 2 * 365 * 86400))
        last = -1
        for _ in range(lengths[u]):
            logit = static[u].copy()
            if last >= 0:
                # content continuity: same subcategory / department / style as the last item
                logit += 1.5 * (item_sub == item_sub[last]) + 0.6 * (item_dept == item_dept[last])
                logit += 0.6 * (item_style == item_style[last])
                # collaborative continuity: the last item's follow-ups
                logit[followups[last]] += 2.5
            logit[seen] = -np.inf
            p = np.exp(logit - logit.max())
            j = int(rng.choice(n_items, p=p / p.sum()))
            seen[j] = True
            t += int(rng.exponential(4 * 86400)) + 60
            inter_rows.append((u, j, t))
            last = j
        # profile: age band, two of the top-3 subcategories (sometimes one stray interest), maybe the style
        top = np.argsort(-(sub_pref[u] * dept_pref[u, [depts.index(d) for d, _ in subs]]))[:3]
        picks = list(rng.choice(top, size=2, replace=False))
        if rng.random() < 0.25:
            picks[1] = rng.integers(n_sub)
        interests = " and ".join(dict.fromkeys(subs[s][1].lower() for s in picks))
        profile = f"Age {AGE_BANDS[age[u]]}. Interested in {interests}."
        if rng.random() < 0.6:
            profile += f" Prefers {STYLES[styles[int(np.argmax(style_pref[u]))]][2]}."
        users_rows.append((f"u{u:05d}", profile))

    inter = pd.DataFrame(inter_rows, columns=["u", "j", "timestamp"])
    u_idx, j_idx = inter["u"].to_numpy(), inter["j"].to_numpy()
    affinity = taste[u_idx, j_idx] + 0.5 * collab[u_idx, j_idx] + 1.5 * item_quality[j_idx] + 2.0 * user_bias[u_idx]
    affinity = affinity + rng.normal(0.0, 1.0, len(inter))
    cuts = np.quantile(affinity, np.cumsum(RATING_SHARES)[:-1])
    rating = (np.searchsorted(cuts, affinity) + 1).astype(float)
    reviews = []
    for j, r in zip(j_idx, rating.astype(int)):
        feat, use = item_feats[j]
        tpl = REVIEWS[r][rng.integers(len(REVIEWS[r]))]
        reviews.append(tpl.format(noun=item_noun[j], feat=feat, use=use))
    interactions = pd.DataFrame(
        {
            "user_id": [f"u{u:05d}" for u in u_idx],
            "item_id": [f"i{j:05d}" for j in j_idx],
            "timestamp": inter["timestamp"].astype("int64"),
            "rating": rating,
            "review": reviews,
        }
    )
    users = pd.DataFrame(users_rows, columns=["user_id", "profile"])
    return RawTables(
        items=items,
        users=users,
        interactions=interactions,
        has_ratings=True,
        report={"source": "demo", "interactions_file": "demo generator", "items_file": "demo generator",
                "users_file": "demo generator"},
    )
