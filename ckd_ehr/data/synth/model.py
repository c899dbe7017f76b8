"""The generative model of the synthetic cohort: patients, admissions, phenotype dynamics,
and the diagnosis / procedure / prescription events of every admission.

Everything is vectorised with numpy; the only Python loops run over visit positions (at
most MAX_ADMISSIONS), phenotypes (25) or clusters (7), never over rows.

The dynamics (what EADF must recover):
- Each patient has a latent propensity per disease cluster (metabolic, cardiac, ...). A visit
  shows part of it: the cluster's marker codes (risk factors such as obesity or tobacco use,
  `synth_catalog.CLUSTER_MARKERS`) are recorded more often the higher the propensity.
- At every admission, acute cluster "events" (e.g. sepsis with shock and acute renal
  failure) and independent onsets add phenotypes; this gives realistic co-occurrence.
- A phenotype present at visit i is present at visit i+1 with its persistence (chronic high,
  acute low), multiplied by `planted_effect` for each planted efficacious drug of that
  phenotype given at visit i. Planted drugs are given to some of the patients with the
  phenotype only (`planted_rate` each). Nothing else (ward drugs, indicated drugs, decoys,
  other phenotypes' drugs) changes persistence, so the planted drugs are the only true effects.
- With `confounding` > 0, a present phenotype is in an acute flare (latent, half of the
  episodes) that resolves more often (persistence times 1 - confounding) and draws the
  phenotype's decoy drugs (no effect) more often; a visit shows a flare only through an
  extra code of the phenotype, recorded more often in flares. A crude given-vs-not comparison
  therefore credits the decoys with an effect they do not have.
- Recorded diagnoses are the true state with `label_noise` flips.

`synth_oracle` gives the exact next-visit probabilities of these dynamics (the latent oracle).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ckd_ehr.data.synth import catalog as cat
from ckd_ehr.config import SynthConfig
from ckd_ehr.phenotypes import NUM_PHENOTYPES, phenotypes

DAY = 86_400
EPOCH_2100 = int(np.datetime64("2100-01-01T00:00:00", "s").astype(np.int64))
YEAR = 365.25 * DAY


@dataclass(frozen=True)
class GeneratorConstants:
    """Fixed parameters of the generator (recorded in ground_truth.json)."""

    max_admissions: int = 40
    first_admission_years: tuple[int, int] = (2100, 2180)
    over_89_fraction: float = 0.06
    age_mean: float = 64.0
    age_sd: float = 16.0
    male_fraction: float = 0.56
    los_median_days: float = 5.5
    los_sigma: float = 0.7
    gap_median_days: float = 200.0
    gap_sigma: float = 1.2
    cluster_sigma: float = 0.9
    initial_scale: float = 3.0
    """Independent presence at a first admission = initial_scale * prevalence * propensity."""
    acute_onset_scale: float = 0.3
    event_scale: float = 0.3
    """Factor on every cluster event rate (CLUSTER_EVENTS) at visits after the first."""
    chronic_onset_scale: float = 0.08
    chf_persistence: float = 0.55
    """CHF is 'acute' in the benchmark's typing but recurs: its own persistence."""
    off_indication_rate: float = 0.01
    marker_scale: float = 0.05
    """Chance per visit that each marker code of a cluster is recorded = min(marker_cap,
    marker_scale * propensity^2): what a visit shows of the latent propensity."""
    marker_cap: float = 0.9
    flare_rate: float = 0.5
    """Share of present phenotypes in an acute flare (used only when confounding > 0)."""
    flare_code_rate: float = 0.6
    """Chance that a flare adds an extra code of its phenotype (the visible proxy); outside
    flares the extra code comes at second_code_rate, acute phenotypes only."""
    decoy_base_rate: float = 0.1
    """Chance that each decoy drug is given when its phenotype is present, outside a flare;
    in a flare: decoy_base_rate + decoy_flare_rate * confounding."""
    decoy_flare_rate: float = 0.7
    indicated_rate: float = 0.6
    second_code_rate: float = 0.15
    code_zipf: float = 1.1
    personal_comorbidities: int = 3
    personal_comorbidity_rate: float = 0.6
    other_dx_base: float = 2.0
    other_dx_per_phenotype: float = 0.5
    procedures_base: float = 2.8
    phenotype_procedure_rate: float = 0.35
    background_drugs: float = 8.0
    repeats_per_los_day: float = 0.28
    max_repeats: int = 30
    hospital_death_base: float = 0.03
    hospital_death_per_acute: float = 0.025
    later_death_rate: float = 0.25


CONSTANTS = GeneratorConstants()

# Per phenotype (label order): target prevalence per admission (MIMIC-III benchmark order of
# magnitude) and the disease cluster driving its onset (-1: none).
PREVALENCE = np.array([0.14, 0.19, 0.09, 0.29, 0.27, 0.42, 0.13, 0.10, 0.32, 0.07, 0.32, 0.27, 0.08,
                       0.14, 0.13, 0.09, 0.18, 0.05, 0.04, 0.08, 0.07, 0.21, 0.13, 0.21, 0.07])
CLUSTERS = ("metabolic", "cardiac", "sepsis", "pulmonary", "gi", "surgical", "neuro")
CLUSTER_OF = np.array([2, 0, 0, 0, 2, 0, 0, 1, 1, 1, 1, 1, 6, 3, 3, 3, 3, 3, 3, 4, 4, 2, 0, 5, 2])
# Cluster events: rate per admission (times the patient's propensity) and member probabilities.
# Diabetes with hypertension and CKD; sepsis with shock and acute renal failure; CHF with
# dysrhythmias; ... (NOTES: co-occurrence must look like MIMIC-III).
CLUSTER_EVENTS = {
    "metabolic": (0.20, {1: 0.45, 2: 0.25, 3: 0.5, 5: 0.6, 6: 0.3, 22: 0.35}),
    "cardiac": (0.20, {11: 0.6, 10: 0.55, 8: 0.5, 7: 0.25, 9: 0.15}),
    "sepsis": (0.10, {0: 0.9, 24: 0.45, 21: 0.55, 16: 0.35, 4: 0.5}),
    "pulmonary": (0.12, {13: 0.6, 14: 0.3, 16: 0.35, 15: 0.3, 17: 0.2}),
    "gi": (0.07, {20: 0.6, 19: 0.5, 4: 0.2}),
    "surgical": (0.10, {23: 0.8, 15: 0.2, 4: 0.2}),
    "neuro": (0.04, {12: 0.9}),
}


@dataclass
class Cohort:
    """Arrays of one generated cohort (indices into the catalogue vocabularies)."""

    # patients (N)
    subject_id: np.ndarray
    gender_male: np.ndarray
    dob: np.ndarray                 # seconds since epoch, midnight
    dod: np.ndarray                 # seconds, midnight; meaningful only where dod_mask is False
    dod_mask: np.ndarray            # True where dod is null
    died_in_hospital: np.ndarray
    dod_ssn_known: np.ndarray
    patient_attrs: dict[str, np.ndarray]   # per-patient categorical indices
    # admissions (A), ordered by patient then time
    adm_patient: np.ndarray
    hadm_id: np.ndarray
    admittime: np.ndarray
    dischtime: np.ndarray
    los_days: np.ndarray
    age_at_admission: np.ndarray
    expire: np.ndarray
    true_state: np.ndarray          # (A, 25) bool
    recorded_state: np.ndarray      # (A, 25) bool
    # event rows
    dx_adm: np.ndarray
    dx_code: np.ndarray             # id into the diagnosis vocabulary
    dx_seq: np.ndarray
    px_adm: np.ndarray
    px_code: np.ndarray             # index into cat.PROCEDURES
    px_seq: np.ndarray
    rx_pair_adm: np.ndarray         # one entry per (admission, drug) given
    rx_pair_drug: np.ndarray        # index into `drugs`
    rx_pair_repeats: np.ndarray
    vocab: cat.DiagnosisVocabulary
    drugs: list[cat.Drug]
    ward_ids: np.ndarray
    indicated_ids: list[np.ndarray]
    planted_ids: np.ndarray         # (25, drugs_per_phenotype)
    decoy_ids: list[np.ndarray]     # per phenotype; empty when confounding is 0
    # latent state (what the latent oracle conditions on)
    propensity: np.ndarray          # (N, clusters)
    planted_given: np.ndarray       # (A, 25, drugs_per_phenotype) bool
    flare: np.ndarray               # (A, 25) bool; all False when confounding is 0

    @property
    def n_prescriptions(self) -> int:
        return int(self.rx_pair_repeats.sum())


def _streams(seed: int, n: int) -> list[np.random.Generator]:
    """Independent generators per part, so a change in one part leaves the others alone."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]


def persistence_per_phenotype(cfg: SynthConfig, c: GeneratorConstants) -> np.ndarray:
    out = np.array([cfg.chronic_persistence if p.kind == "chronic" else cfg.acute_persistence
                    for p in phenotypes()])
    chf = [p.index for p in phenotypes() if p.name.startswith("Congestive heart failure")]
    out[chf] = max(min(c.chf_persistence, cfg.chronic_persistence), cfg.acute_persistence)
    return out


def _positions_within(groups_sorted: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal values of a sorted array."""
    n = len(groups_sorted)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.r_[0, np.flatnonzero(np.diff(groups_sorted)) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, n]))
    return np.arange(n) - run_start


def _choice(rng: np.random.Generator, ids: np.ndarray, weights: np.ndarray, size) -> np.ndarray:
    return ids[rng.choice(len(ids), size=size, p=weights)]


def _dynamics(r_dyn, r_conf, cfg: SynthConfig, c: GeneratorConstants, kinds: np.ndarray, n_adm: np.ndarray,
              adm_start: np.ndarray) -> tuple[np.ndarray, ...]:
    """(propensity, true_state, planted_given, flare, recorded) of every admission: each
    phenotype's onset, persistence (lengthened by the planted drugs given, cut by flares) and
    cluster events, visit by visit, then the recorded state with label noise."""
    n, a_total = len(n_adm), int(n_adm.sum())
    k = cfg.drugs_per_phenotype
    propensity = r_dyn.lognormal(-c.cluster_sigma ** 2 / 2, c.cluster_sigma, (n, len(CLUSTERS)))
    persistence = persistence_per_phenotype(cfg, c)
    onset_scale = np.where(kinds, c.chronic_onset_scale, c.acute_onset_scale)
    true_state = np.zeros((a_total, NUM_PHENOTYPES), dtype=bool)
    planted_given = np.zeros((a_total, NUM_PHENOTYPES, k), dtype=bool)
    flare = np.zeros((a_total, NUM_PHENOTYPES), dtype=bool)
    for j in range(int(n_adm.max())):
        pats = np.flatnonzero(n_adm > j)
        rows = adm_start[pats] + j
        prop = propensity[pats][:, CLUSTER_OF]
        scale = c.initial_scale if j == 0 else onset_scale
        state = r_dyn.random((len(pats), NUM_PHENOTYPES)) < np.minimum(0.95, scale * PREVALENCE * prop)
        for ci, name in enumerate(CLUSTERS):
            rate, members = CLUSTER_EVENTS[name]
            fired = r_dyn.random(len(pats)) < rate * (1.0 if j == 0 else c.event_scale) * propensity[pats, ci]
            idx = np.fromiter(members, dtype=np.int64)
            probs = np.fromiter(members.values(), dtype=float)
            state[:, idx] |= fired[:, None] & (r_dyn.random((len(pats), len(idx))) < probs)
        if j > 0:
            prev = rows - 1
            keep_p = keep_probability(persistence, planted_given[prev].sum(axis=2), flare[prev], cfg)
            keep = r_dyn.random((len(pats), NUM_PHENOTYPES)) < keep_p
            state |= true_state[prev] & keep
        true_state[rows] = state
        if cfg.confounding > 0:
            flare[rows] = state & (r_conf.random(state.shape) < c.flare_rate)
        u = r_dyn.random((len(pats), NUM_PHENOTYPES, k))
        planted_given[rows] = (state[:, :, None] & (u < cfg.planted_rate)) | (u > 1.0 - c.off_indication_rate)

    flips = r_dyn.random(true_state.shape) < cfg.label_noise
    recorded = true_state ^ flips
    return propensity, true_state, planted_given, flare, recorded


def simulate(cfg: SynthConfig, c: GeneratorConstants = CONSTANTS) -> Cohort:
    r_pat, r_adm, r_dyn, r_dx, r_px, r_rx, r_conf = _streams(cfg.seed, 7)
    n = cfg.patients
    kinds = np.array([p.kind == "chronic" for p in phenotypes()])

    # --- patients and admission times -----------------------------------------------
    n_adm = np.minimum(r_pat.geometric(1.0 / cfg.mean_admissions, n), c.max_admissions)
    id_space = max(100_000, 2 * n)
    subject_id = np.sort(r_pat.choice(id_space - 1, n, replace=False) + 1).astype(np.int64)
    male = r_pat.random(n) < c.male_fraction
    over_89 = r_pat.random(n) < c.over_89_fraction
    age0 = np.clip(r_pat.normal(c.age_mean, c.age_sd, n), 18.0, 89.0)
    # MIMIC-III shifts the DOB of patients over 89 so they appear about 300 years old.
    age0 = np.where(over_89, 300.0 + r_pat.random(n) * 9.0, age0)
    y0, y1 = c.first_admission_years
    first_admit = EPOCH_2100 + ((y0 - 2100) * YEAR + r_pat.random(n) * (y1 - y0) * YEAR).astype(np.int64)
    first_admit -= first_admit % 60
    dob = first_admit - (age0 * YEAR).astype(np.int64)
    dob -= dob % DAY

    a_total = int(n_adm.sum())
    adm_patient = np.repeat(np.arange(n), n_adm)
    adm_start = np.r_[0, np.cumsum(n_adm)[:-1]]
    los = np.clip(r_adm.lognormal(np.log(c.los_median_days), c.los_sigma, a_total), 0.2, 120.0)
    gap = np.maximum(r_adm.lognormal(np.log(c.gap_median_days), c.gap_sigma, a_total), 1.0)
    step = ((los + gap) * DAY).astype(np.int64)
    step -= step % 60
    before = np.cumsum(step) - step  # exclusive cumulative sum over all admissions
    admittime = first_admit[adm_patient] + before - before[adm_start][adm_patient]
    dischtime = admittime + (los * DAY).astype(np.int64)
    dischtime -= dischtime % 60
    age_at_adm = age0[adm_patient] + (admittime - first_admit[adm_patient]) / YEAR
    hadm_space = max(100_000, 2 * a_total)
    hadm_id = (r_adm.choice(hadm_space, a_total, replace=False) + 100_000).astype(np.int64)

    # --- phenotype dynamics and the drugs that act on them --------------------------
    propensity, true_state, planted_given, flare, recorded = _dynamics(r_dyn, r_conf, cfg, c, kinds, n_adm, adm_start)

    # --- deaths: only at a patient's last admission ----------------------------------
    last = adm_start + n_adm - 1
    acute_count = (recorded[last] & ~kinds).sum(axis=1)
    died_in_hospital = r_pat.random(n) < np.minimum(0.5, c.hospital_death_base + c.hospital_death_per_acute * acute_count)
    expire = np.zeros(a_total, dtype=bool)
    expire[last[died_in_hospital]] = True
    later = ~died_in_hospital & (r_pat.random(n) < c.later_death_rate)
    dod = np.where(died_in_hospital, dischtime[last],
                   dischtime[last] + (r_pat.exponential(400.0, n) * DAY).astype(np.int64))
    dod -= dod % DAY
    dod_mask = ~(died_in_hospital | later)
    dod_ssn_known = r_pat.random(n) < 0.8

    vocab = cat.diagnosis_vocabulary(c.code_zipf)
    dx_adm, dx_code, dx_seq = _diagnoses(r_dx, recorded, adm_patient, n, kinds, vocab, c, propensity, flare, r_conf)
    px_adm, px_code, px_seq = _procedures(r_px, true_state, c)
    drugs, ward_ids, indicated_ids, planted_ids, decoy_ids, pairs = _prescriptions(
        r_rx, cfg, c, true_state, planted_given, los, flare, r_conf)

    attrs = _patient_attributes(r_pat, n)
    return Cohort(
        subject_id=subject_id, gender_male=male, dob=dob, dod=dod, dod_mask=dod_mask,
        died_in_hospital=died_in_hospital, dod_ssn_known=dod_ssn_known, patient_attrs=attrs,
        adm_patient=adm_patient, hadm_id=hadm_id, admittime=admittime, dischtime=dischtime,
        los_days=los, age_at_admission=age_at_adm, expire=expire, true_state=true_state,
        recorded_state=recorded, dx_adm=dx_adm, dx_code=dx_code, dx_seq=dx_seq,
        px_adm=px_adm, px_code=px_code, px_seq=px_seq, rx_pair_adm=pairs[0], rx_pair_drug=pairs[1],
        rx_pair_repeats=pairs[2], vocab=vocab, drugs=drugs, ward_ids=ward_ids,
        indicated_ids=indicated_ids, planted_ids=planted_ids, decoy_ids=decoy_ids,
        propensity=propensity, planted_given=planted_given, flare=flare,
    )


def keep_probability(persistence: np.ndarray, n_planted: np.ndarray, flare: np.ndarray, cfg: SynthConfig
                     ) -> np.ndarray:
    """Chance that a phenotype present at visit i is still present at visit i+1 (before onsets):
    persistence x planted_effect^(planted drugs given) x (1 - confounding in a flare)."""
    return persistence * cfg.planted_effect ** n_planted * np.where(flare, 1.0 - cfg.confounding, 1.0)


def _dedupe_and_order(adm: np.ndarray, item: np.ndarray, key: np.ndarray, n_items: int):
    """Drop repeated (admission, item) pairs, then order by admission and `key`;
    return (adm, item, seq_num starting at 1)."""
    _, first = np.unique(adm.astype(np.int64) * n_items + item, return_index=True)
    adm, item, key = adm[first], item[first], key[first]
    order = np.lexsort((key, adm))
    adm, item = adm[order], item[order]
    return adm, item, _positions_within(adm) + 1


def _diagnoses(rng, recorded, adm_patient, n_patients, kinds, vocab: cat.DiagnosisVocabulary, c,
               propensity, flare, r_conf):
    adms, codes = [], []
    for p in range(NUM_PHENOTYPES):
        rows = np.flatnonzero(recorded[:, p])
        ids, w = vocab.phenotype_code_ids[p], vocab.phenotype_code_weights[p]
        if kinds[p]:  # a chronic disease keeps its code across a patient's admissions
            per_patient = _choice(rng, ids, w, n_patients)
            chosen = per_patient[adm_patient[rows]]
        else:
            chosen = _choice(rng, ids, w, len(rows))
            extra = rows[rng.random(len(rows)) < c.second_code_rate]
            adms.append(extra)
            codes.append(_choice(rng, ids, w, len(extra)))
        if flare.any():  # the visible proxy of a flare: one more code of the phenotype
            fl = rows[flare[rows, p] & (r_conf.random(len(rows)) < c.flare_code_rate)]
            adms.append(fl)
            codes.append(_choice(r_conf, ids, w, len(fl)))
        adms.append(rows)
        codes.append(chosen)
    # Cluster markers: risk factors shown more often the higher the patient's propensity.
    code_index = {code: i for i, code in enumerate(vocab.codes)}
    a_total = len(adm_patient)
    for ci, name in enumerate(CLUSTERS):
        marker_ids = np.array([code_index[m] for m in cat.CLUSTER_MARKERS[name]])
        p_show = np.minimum(c.marker_cap, c.marker_scale * propensity[adm_patient, ci] ** 2)
        r, col = np.nonzero(rng.random((a_total, len(marker_ids))) < p_show[:, None])
        adms.append(r)
        codes.append(marker_ids[col])
    # Personal comorbidities recur across a patient's admissions; the rest are sporadic.
    other_ids, other_w = vocab.other_code_ids, vocab.other_code_weights
    personal = _choice(rng, other_ids, other_w, (n_patients, c.personal_comorbidities))
    present = rng.random((a_total, c.personal_comorbidities)) < c.personal_comorbidity_rate
    r, col = np.nonzero(present)
    adms.append(r)
    codes.append(personal[adm_patient[r], col])
    n_other = rng.poisson(c.other_dx_base + c.other_dx_per_phenotype * recorded.sum(axis=1))
    adms.append(np.repeat(np.arange(a_total), n_other))
    codes.append(_choice(rng, other_ids, other_w, int(n_other.sum())))
    adm = np.concatenate(adms).astype(np.int64)
    code = np.concatenate(codes).astype(np.int64)
    # Priority: acute phenotype codes tend to come first, then chronic ones, then the rest.
    code_class = np.full(len(vocab.codes), 0.9)
    for p in range(NUM_PHENOTYPES):
        code_class[vocab.phenotype_code_ids[p]] = 0.6 if kinds[p] else 0.0
    key = code_class[code] + rng.random(len(code))
    return _dedupe_and_order(adm, code, key, len(vocab.codes))


def _procedures(rng, true_state, c):
    index = {code: i for i, (code, _, _) in enumerate(cat.PROCEDURES)}
    a_total = len(true_state)
    w = 1.0 / np.arange(1, len(cat.PROCEDURES) + 1) ** c.code_zipf
    n_generic = rng.poisson(c.procedures_base, a_total)
    adms = [np.repeat(np.arange(a_total), n_generic)]
    codes = [rng.choice(len(cat.PROCEDURES), int(n_generic.sum()), p=w / w.sum())]
    for p, linked in sorted(cat.PHENOTYPE_PROCEDURES.items()):
        rows = np.flatnonzero(true_state[:, p])
        for code in linked:
            done = rows[rng.random(len(rows)) < c.phenotype_procedure_rate]
            adms.append(done)
            codes.append(np.full(len(done), index[code]))
    adm = np.concatenate(adms).astype(np.int64)
    code = np.concatenate(codes).astype(np.int64)
    return _dedupe_and_order(adm, code, rng.random(len(code)), len(cat.PROCEDURES))


def _prescriptions(rng, cfg, c, true_state, planted_given, los, flare, r_conf):
    """(drug catalogue, ward ids, indicated ids per phenotype, planted ids (25, k), decoy ids
    per phenotype, (admission, drug, repeats) per distinct drug given in an admission)."""
    a_total = len(true_state)
    k = cfg.drugs_per_phenotype
    ward = [d for d, _ in cat.WARD_DRUGS]
    ward_p = np.array([p for _, p in cat.WARD_DRUGS])
    indicated = cat.indicated_drugs()
    background = list(cat.BACKGROUND_DRUGS)
    planted_names = cat.planted_drug_names(k)
    planted = [cat.planted_drug(name) for names in planted_names for name in names]
    decoy_names = cat.decoy_drug_names() if cfg.confounding > 0 else [[] for _ in range(NUM_PHENOTYPES)]
    decoys = [cat.planted_drug(name) for names in decoy_names for name in names]
    drugs = ward + [d for group in indicated for d in group] + background + planted + decoys
    names = [d.name for d in drugs]
    if len(set(names)) != len(names):
        raise RuntimeError("drug catalogue has duplicate names")
    ward_ids = np.arange(len(ward))
    start = len(ward)
    indicated_ids = []
    for group in indicated:
        indicated_ids.append(np.arange(start, start + len(group)))
        start += len(group)
    background_ids = np.arange(start, start + len(background))
    start += len(background)
    planted_ids = np.arange(start, start + NUM_PHENOTYPES * k).reshape(NUM_PHENOTYPES, k)
    start += NUM_PHENOTYPES * k
    decoy_ids = []
    for names in decoy_names:
        decoy_ids.append(np.arange(start, start + len(names)))
        start += len(names)

    adms, ids = [], []
    r, col = np.nonzero(rng.random((a_total, len(ward))) < ward_p)  # regardless of disease
    adms.append(r)
    ids.append(ward_ids[col])
    ind_pheno = np.concatenate([np.full(len(g), p) for p, g in enumerate(indicated_ids)])
    ind_ids = np.concatenate(indicated_ids)
    u = rng.random((a_total, len(ind_ids)))
    r, col = np.nonzero((true_state[:, ind_pheno] & (u < c.indicated_rate)) | (u > 1.0 - c.off_indication_rate))
    adms.append(r)
    ids.append(ind_ids[col])
    r, col = np.nonzero(planted_given.reshape(a_total, -1))
    adms.append(r)
    ids.append(planted_ids.reshape(-1)[col])
    if cfg.confounding > 0:  # decoys: given more often in flares (which resolve more often)
        for p, ids_p in enumerate(decoy_ids):
            rate = np.where(flare[:, p], c.decoy_base_rate + c.decoy_flare_rate * cfg.confounding,
                            c.decoy_base_rate)
            r, col = np.nonzero(true_state[:, p, None] & (r_conf.random((a_total, len(ids_p))) < rate[:, None]))
            adms.append(r)
            ids.append(ids_p[col])
    n_bg = rng.poisson(c.background_drugs, a_total)
    adms.append(np.repeat(np.arange(a_total), n_bg))
    w = 1.0 / np.arange(1, len(background) + 1) ** c.code_zipf
    ids.append(_choice(rng, background_ids, w / w.sum(), int(n_bg.sum())))
    adm = np.concatenate(adms).astype(np.int64)
    drug = np.concatenate(ids).astype(np.int64)
    _, first = np.unique(adm * len(drugs) + drug, return_index=True)
    adm, drug = adm[first], drug[first]  # sorted by admission, then drug id
    repeats = np.minimum(1 + rng.poisson(c.repeats_per_los_day * los[adm]), c.max_repeats)
    return drugs, ward_ids, indicated_ids, planted_ids, decoy_ids, (adm, drug, repeats)


# Per-patient categorical attributes: (values, weights). None is a null in the table.
PATIENT_CATEGORIES = {
    "ethnicity": (("WHITE", "BLACK/AFRICAN AMERICAN", "HISPANIC OR LATINO", "ASIAN", "UNKNOWN/NOT SPECIFIED",
                   "OTHER", "UNABLE TO OBTAIN"), (0.70, 0.09, 0.04, 0.03, 0.08, 0.03, 0.03)),
    "language": (("ENGL", None, "SPAN", "RUSS", "PTUN", "CANT"), (0.56, 0.35, 0.05, 0.02, 0.01, 0.01)),
    "religion": (("CATHOLIC", "NOT SPECIFIED", "UNOBTAINABLE", "PROTESTANT QUAKER", "JEWISH", "OTHER", None),
                 (0.35, 0.20, 0.14, 0.13, 0.08, 0.05, 0.05)),
    "marital_status": (("MARRIED", "SINGLE", "WIDOWED", "DIVORCED", "SEPARATED", None),
                       (0.45, 0.25, 0.12, 0.06, 0.02, 0.10)),
}


def _patient_attributes(rng, n: int) -> dict[str, np.ndarray]:
    return {name: rng.choice(len(values), n, p=np.asarray(w) / np.sum(w))
            for name, (values, w) in PATIENT_CATEGORIES.items()}


def constants_dict(c: GeneratorConstants = CONSTANTS) -> dict:
    out = dataclasses.asdict(c)
    out["prevalence"] = PREVALENCE.tolist()
    out["cluster_of_phenotype"] = [CLUSTERS[i] for i in CLUSTER_OF]
    out["cluster_events"] = {k: {"rate": r, "members": {str(p): q for p, q in m.items()}}
                             for k, (r, m) in CLUSTER_EVENTS.items()}
    out["ward_drug_rates"] = {d.name: p for d, p in cat.WARD_DRUGS}
    out["cluster_markers"] = {k: list(v) for k, v in cat.CLUSTER_MARKERS.items()}
    return out
