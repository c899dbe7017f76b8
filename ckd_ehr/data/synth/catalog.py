"""Fixed vocabularies of the synthetic cohort: code titles, drugs, procedures, planted names.

Everything here is static text, independent of the generator seed, so two cohorts with
different seeds share one dictionary and one ground truth of planted drug names. The
dynamics that use these lists live in `synth.py`.

Real ICD-9-CM codes are used with titles written for this project (not copied from the
MIMIC-III dictionary). Drug names are common hospital drugs; planted efficacious drugs
are invented names (`planted_drug_names`) so no real drug is claimed to work.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from ckd_ehr.phenotypes import NUM_PHENOTYPES, code_to_phenotype_table, phenotypes

# --- phenotypes ---------------------------------------------------------------------------

# Short clinical display name per phenotype (label order): the stem of generated titles,
# kept short so rendered visit text stays around 600-1500 characters.
PHENOTYPE_DISPLAY = (
    "Septicemia", "Diabetes mellitus", "Diabetes with complications", "Hyperlipidemia",
    "Fluid and electrolyte disorder", "Essential hypertension", "Hypertensive heart and kidney disease",
    "Acute myocardial infarction", "Coronary atherosclerosis", "Conduction disorder",
    "Cardiac dysrhythmia", "Congestive heart failure", "Acute cerebrovascular disease", "Pneumonia",
    "Chronic obstructive lung disease", "Pleural disorder", "Respiratory failure",
    "Lower respiratory disease", "Upper respiratory disease", "Liver disease",
    "Gastrointestinal hemorrhage", "Acute kidney failure", "Chronic kidney disease",
    "Complication of medical care", "Shock",
)

# Admission diagnosis (ADMISSIONS.diagnosis) when the phenotype leads the admission.
ADMIT_REASON = (
    "SEPSIS", "HYPERGLYCEMIA", "DIABETIC KETOACIDOSIS", "CHEST PAIN", "HYPONATREMIA", "HYPERTENSION",
    "HYPERTENSIVE URGENCY", "ST ELEVATION MYOCARDIAL INFARCTION", "CORONARY ARTERY DISEASE",
    "BRADYCARDIA", "ATRIAL FIBRILLATION", "CONGESTIVE HEART FAILURE", "STROKE", "PNEUMONIA",
    "COPD EXACERBATION", "PLEURAL EFFUSION", "RESPIRATORY FAILURE", "SHORTNESS OF BREATH",
    "UPPER AIRWAY OBSTRUCTION", "CIRRHOSIS", "GASTROINTESTINAL BLEED", "ACUTE RENAL FAILURE",
    "RENAL FAILURE", "POST-OPERATIVE COMPLICATION", "HYPOTENSION",
)
ADMIT_REASON_OTHER = ("FALL", "ALTERED MENTAL STATUS", "SYNCOPE", "ABDOMINAL PAIN", "FEVER", "WEAKNESS")

# Qualifiers that turn a display name into a code title, one per code of a phenotype.
_QUALIFIERS = (
    ("unspecified", "NOS"), ("specified type", "spec"), ("acute", "ac"), ("chronic", "chr"),
    ("with exacerbation", "w exac"), ("of unspecified type", "unsp typ"), ("initial episode", "init"),
    ("subsequent episode", "subseq"), ("recurrent", "recur"), ("severe", "sev"), ("mild", "mild"),
    ("other specified", "oth spec"), ("due to infection", "d/t inf"), ("with hemorrhage", "w hem"),
    ("postoperative", "postop"), ("primary", "prim"), ("secondary", "sec"), ("bilateral", "bilat"),
    ("with obstruction", "w obst"), ("not elsewhere classified", "NEC"), ("late effect", "late eff"),
    ("uncontrolled", "unctrl"), ("controlled", "ctrl"), ("status", "stat"),
)

# Common codes with real titles (short, long); they are also drawn more often (listed first).
KNOWN_DX_TITLES = {
    "0389": ("Septicemia NOS", "Unspecified septicemia"),
    "99591": ("Sepsis", "Sepsis"),
    "99592": ("Severe sepsis", "Severe sepsis"),
    "03842": ("E coli septicemia", "Septicemia due to escherichia coli"),
    "25000": ("DMII wo cmp nt st uncntr", "Diabetes mellitus type II without complication"),
    "25001": ("DMI wo cmp nt st uncntrl", "Diabetes mellitus type I without complication"),
    "25040": ("DMII renl nt st uncntrld", "Diabetes with renal manifestations, type II"),
    "25060": ("DMII neuro nt st uncntrl", "Diabetes with neurological manifestations, type II"),
    "2724": ("Hyperlipidemia NEC/NOS", "Other and unspecified hyperlipidemia"),
    "2720": ("Pure hypercholesterolem", "Pure hypercholesterolemia"),
    "2761": ("Hyposmolality", "Hyposmolality and/or hyponatremia"),
    "2762": ("Acidosis", "Acidosis"),
    "2768": ("Hypopotassemia", "Hypopotassemia"),
    "2767": ("Hyperpotassemia", "Hyperpotassemia"),
    "4019": ("Hypertension NOS", "Unspecified essential hypertension"),
    "40391": ("Hyp kid NOS w cr kid V", "Hypertensive chronic kidney disease with stage V or end stage"),
    "40390": ("Hy kid NOS w cr kid I-IV", "Hypertensive chronic kidney disease, stage I-IV"),
    "41071": ("Subendo infarct, initial", "Subendocardial infarction, initial episode of care"),
    "41401": ("Crnry athrscl natve vssl", "Coronary atherosclerosis of native coronary artery"),
    "412": ("Old myocardial infarct", "Old myocardial infarction"),
    "42731": ("Atrial fibrillation", "Atrial fibrillation"),
    "4275": ("Cardiac arrest", "Cardiac arrest"),
    "4280": ("CHF NOS", "Congestive heart failure, unspecified"),
    "42833": ("Ac on chr diast hrt fail", "Acute on chronic diastolic heart failure"),
    "486": ("Pneumonia, organism NOS", "Pneumonia, organism unspecified"),
    "5070": ("Food/vomit pneumonitis", "Pneumonitis due to inhalation of food or vomitus"),
    "496": ("Chr airway obstruct NEC", "Chronic airway obstruction, not elsewhere classified"),
    "5119": ("Pleural effusion NOS", "Unspecified pleural effusion"),
    "51881": ("Acute respiratry failure", "Acute respiratory failure"),
    "5849": ("Acute kidney failure NOS", "Acute kidney failure, unspecified"),
    "5845": ("Ac kidny fail, tubr necr", "Acute kidney failure with lesion of tubular necrosis"),
    "5859": ("Chronic kidney dis NOS", "Chronic kidney disease, unspecified"),
    "5856": ("End stage renal disease", "End stage renal disease"),
    "5789": ("Gastrointest hemorr NOS", "Hemorrhage of gastrointestinal tract, unspecified"),
    "5715": ("Cirrhosis of liver NOS", "Cirrhosis of liver without mention of alcohol"),
    "78552": ("Septic shock", "Septic shock"),
    "78551": ("Cardiogenic shock", "Cardiogenic shock"),
    "99702": ("Iatrogen cv infarc/hmrhg", "Iatrogenic cerebrovascular infarction or hemorrhage"),
    "9971": ("Surg comp-heart", "Cardiac complications, not elsewhere classified"),
    "43491": ("Crbl art ocl NOS w infrc", "Cerebral artery occlusion, unspecified, with infarction"),
}

# Non-phenotype diagnosis codes (code, short title, long title), most common first. Codes
# that belong to one of the 25 phenotypes are filtered out in `diagnosis_vocabulary`.
OTHER_DX = (
    ("V5861", "Long-term use anticoagul", "Long-term (current) use of anticoagulants"),
    ("2859", "Anemia NOS", "Anemia, unspecified"),
    ("53081", "Esophageal reflux", "Esophageal reflux"),
    ("V1582", "History of tobacco use", "History of tobacco use"),
    ("2449", "Hypothyroidism NOS", "Unspecified acquired hypothyroidism"),
    ("V5867", "Long-term use of insulin", "Long-term (current) use of insulin"),
    ("311", "Depressive disorder NEC", "Depressive disorder, not elsewhere classified"),
    ("2851", "Ac posthemorrhag anemia", "Acute posthemorrhagic anemia"),
    ("5990", "Urin tract infection NOS", "Urinary tract infection, site not specified"),
    ("2875", "Thrombocytopenia NOS", "Thrombocytopenia, unspecified"),
    ("30000", "Anxiety state NOS", "Anxiety state, unspecified"),
    ("27800", "Obesity NOS", "Obesity, unspecified"),
    ("3051", "Tobacco use disorder", "Tobacco use disorder"),
    ("32723", "Obstructive sleep apnea", "Obstructive sleep apnea"),
    ("4241", "Aortic valve disorder", "Aortic valve disorders"),
    ("4240", "Mitral valve disorder", "Mitral valve disorders"),
    ("V4986", "Do not resuscitate stat", "Do not resuscitate status"),
    ("V667", "Encounter palliative care", "Encounter for palliative care"),
    ("30500", "Alcohol abuse-unspec", "Alcohol abuse, unspecified"),
    ("V1251", "Hx venous thrombosis/emb", "Personal history of venous thrombosis and embolism"),
    ("2809", "Iron defic anemia NOS", "Iron deficiency anemia, unspecified"),
    ("4439", "Periph vascular dis NOS", "Peripheral vascular disease, unspecified"),
    ("60000", "BPH w/o urinary obs", "Hypertrophy of prostate without urinary obstruction"),
    ("71590", "Osteoarthros NOS-unspec", "Osteoarthrosis, unspecified site"),
    ("3310", "Alzheimer's disease", "Alzheimer's disease"),
    ("29410", "Dementia w/o behav dist", "Dementia without behavioral disturbance"),
    ("2930", "Delirium d/t other cond", "Delirium due to conditions classified elsewhere"),
    ("E8497", "Accid in resident instit", "Accidents occurring in residential institution"),
    ("E8490", "Accident at home", "Accidents occurring in home"),
    ("E8788", "Abn react-surg proc NEC", "Other specified surgical operations causing abnormal reaction"),
    ("E9342", "Adv eff anticoagulants", "Anticoagulants causing adverse effects in therapeutic use"),
    ("E8889", "Fall NOS", "Unspecified fall"),
    ("V5866", "Long-term use aspirin", "Long-term (current) use of aspirin"),
    ("2639", "Protein-cal malnutr NOS", "Unspecified protein-calorie malnutrition"),
    ("7994", "Cachexia", "Cachexia"),
    ("78079", "Malaise and fatigue NEC", "Other malaise and fatigue"),
    ("7802", "Syncope and collapse", "Syncope and collapse"),
    ("78650", "Chest pain NOS", "Chest pain, unspecified"),
    ("78820", "Retention urine NOS", "Retention of urine, unspecified"),
    ("5601", "Paralytic ileus", "Paralytic ileus"),
    ("5609", "Intestinal obstruct NOS", "Unspecified intestinal obstruction"),
    ("56210", "Dvrtclo colon w/o hmrhg", "Diverticulosis of colon without hemorrhage"),
    ("00845", "Int inf clstrdium dfcile", "Intestinal infection due to Clostridium difficile"),
    ("0414", "E. coli infect NOS", "Escherichia coli infection, unspecified site"),
    ("04111", "Meth susc Staph aureus", "Methicillin susceptible Staphylococcus aureus infection"),
    ("04112", "MRSA elsewhere/NOS", "Methicillin resistant Staphylococcus aureus infection"),
    ("1120", "Thrush", "Candidiasis of mouth"),
    ("6826", "Cellulitis of leg", "Cellulitis and abscess of leg, except foot"),
    ("70703", "Pressure ulcer, low back", "Pressure ulcer, lower back"),
    ("45340", "Ac DVT/emb low ext NOS", "Acute deep venous thrombosis of lower extremity"),
    ("1970", "Secondary malig neo lung", "Secondary malignant neoplasm of lung"),
    ("1983", "Second malig neo brain", "Secondary malignant neoplasm of brain and spinal cord"),
    ("1629", "Mal neo bronch/lung NOS", "Malignant neoplasm of bronchus and lung, unspecified"),
    ("1749", "Malign neopl breast NOS", "Malignant neoplasm of breast, unspecified"),
    ("185", "Malign neopl prostate", "Malignant neoplasm of prostate"),
    ("1539", "Malig neo colon NOS", "Malignant neoplasm of colon, unspecified"),
    ("20300", "Mult mye w/o remission", "Multiple myeloma, without remission"),
    ("28800", "Neutropenia NOS", "Neutropenia, unspecified"),
    ("3320", "Paralysis agitans", "Paralysis agitans"),
    ("34590", "Epilep NOS w/o intr epil", "Epilepsy, unspecified, without intractable epilepsy"),
    ("78039", "Other convulsions", "Other convulsions"),
    ("73300", "Osteoporosis NOS", "Osteoporosis, unspecified"),
    ("7245", "Backache NOS", "Backache, unspecified"),
    ("V5865", "Long-term use steroids", "Long-term (current) use of steroids"),
    ("V1588", "History of fall", "History of fall"),
    ("V433", "Heart valve replac NEC", "Heart valve replaced by other means"),
    ("V090", "Inf mcrg rstn pncllns", "Infection with microorganisms resistant to penicillins"),
    ("V4364", "Hip joint replacement", "Hip joint replaced by other means"),
    ("V4365", "Knee joint replacement", "Knee joint replaced by other means"),
    ("7140", "Rheumatoid arthritis", "Rheumatoid arthritis"),
    ("V1046", "Hx of prostate malignancy", "Personal history of malignant neoplasm of prostate"),
    ("V103", "Hx of breast malignancy", "Personal history of malignant neoplasm of breast"),
    ("5589", "Noninf gastroenterit NEC", "Other noninfectious gastroenteritis and colitis"),
    ("E8798", "Abn react-procedure NEC", "Other specified procedures causing abnormal reaction"),
    ("3559", "Mononeuritis NOS", "Mononeuritis of unspecified site"),
    ("36250", "Macular degeneration NOS", "Macular degeneration (senile), unspecified"),
    ("3659", "Glaucoma NOS", "Unspecified glaucoma"),
    ("3899", "Hearing loss NOS", "Unspecified hearing loss"),
    ("6000", "Hypertrophy of prostate", "Hypertrophy (benign) of prostate"),
    ("2800", "Chr blood loss anemia", "Iron deficiency anemia secondary to chronic blood loss"),
)

# --- procedures ---------------------------------------------------------------------------

PROCEDURES = (  # (code, short title, long title), most common first
    ("3893", "Venous cath NEC", "Venous catheterization, not elsewhere classified"),
    ("9904", "Packed cell transfusion", "Transfusion of packed cells"),
    ("9604", "Insert endotracheal tube", "Insertion of endotracheal tube"),
    ("9671", "Cont inv mec ven <96 hrs", "Continuous invasive mechanical ventilation, less than 96 hours"),
    ("3891", "Arterial catheterization", "Arterial catheterization"),
    ("9672", "Cont inv mec ven 96+ hrs", "Continuous invasive mechanical ventilation, 96 hours or more"),
    ("9915", "Parent infus nutrit sub", "Parenteral infusion of concentrated nutritional substances"),
    ("3995", "Hemodialysis", "Hemodialysis"),
    ("8856", "Coronar arteriogr-2 cath", "Coronary arteriography using two catheters"),
    ("3722", "Left heart cardiac cath", "Left heart cardiac catheterization"),
    ("0066", "PTCA", "Percutaneous transluminal coronary angioplasty"),
    ("3607", "Ins drug-elut coronry st", "Insertion of drug-eluting coronary artery stent"),
    ("0045", "Insert 1 vascular stent", "Insertion of one vascular stent"),
    ("0040", "Procedure-one vessel", "Procedure on single vessel"),
    ("3615", "1 int mam-cor art bypass", "Single internal mammary-coronary artery bypass"),
    ("3961", "Extracorporeal circulat", "Extracorporeal circulation auxiliary to open heart surgery"),
    ("3895", "Ven cath renal dialysis", "Venous catheterization for renal dialysis"),
    ("8872", "Dx ultrasound-heart", "Diagnostic ultrasound of heart"),
    ("4513", "Sm bowel endoscopy NEC", "Other endoscopy of small intestine"),
    ("4516", "EGD with closed biopsy", "Esophagogastroduodenoscopy with closed biopsy"),
    ("4443", "Endosc control gast hem", "Endoscopic control of gastric or duodenal bleeding"),
    ("4523", "Colonoscopy", "Colonoscopy"),
    ("5491", "Percu abdominal drainage", "Percutaneous abdominal drainage"),
    ("3491", "Thoracentesis", "Thoracentesis"),
    ("3404", "Insert intercostal cath", "Insertion of intercostal catheter for drainage"),
    ("3324", "Closed bronchial biopsy", "Closed endoscopic biopsy of bronchus"),
    ("3322", "Fiber-optic bronchoscopy", "Fiber-optic bronchoscopy"),
    ("3129", "Other perm tracheostomy", "Other permanent tracheostomy"),
    ("4311", "Percu endosc gastrostomy", "Percutaneous endoscopic gastrostomy"),
    ("9390", "Non-invasive mech vent", "Non-invasive mechanical ventilation"),
    ("8703", "C.A.T. scan of head", "Computerized axial tomography of head"),
    ("8741", "C.A.T. scan of thorax", "Computerized axial tomography of thorax"),
    ("8801", "C.A.T. scan of abdomen", "Computerized axial tomography of abdomen"),
    ("8891", "MRI brain & brain stem", "Magnetic resonance imaging of brain and brain stem"),
    ("0014", "Injection oxazolidinone", "Injection or infusion of oxazolidinone class of antibiotics"),
    ("9925", "Inject ca chemother NEC", "Injection or infusion of cancer chemotherapeutic substance"),
    ("0331", "Spinal tap", "Spinal tap"),
    ("9962", "Heart countershock NEC", "Other electric countershock of heart"),
    ("9960", "Cardiopulm resuscita NOS", "Cardiopulmonary resuscitation, not otherwise specified"),
    ("0017", "Infusion of vasopressor", "Infusion of vasopressor agent"),
    ("3783", "Int insert dual-cham dev", "Initial insertion of dual-chamber device"),
    ("8154", "Total knee replacement", "Total knee replacement"),
    ("8151", "Total hip replacement", "Total hip replacement"),
    ("5123", "Laparoscopic cholecystec", "Laparoscopic cholecystectomy"),
    ("8622", "Exc wound debridement", "Excisional debridement of wound, infection, or burn"),
    ("5794", "Insert indwelling cath", "Insertion of indwelling urinary catheter"),
)

# Procedures that follow a phenotype: phenotype index -> procedure codes (each done with
# PHENOTYPE_PROCEDURE_RATE when the phenotype is present).
PHENOTYPE_PROCEDURES = {
    0: ("3893", "3891"), 7: ("3722", "8856", "0066", "3607"), 8: ("3722", "8856"),
    9: ("3783",), 10: ("9962", "3783"), 11: ("8872",), 12: ("8703", "8891"), 13: ("3322", "3324"),
    15: ("3491", "3404"), 16: ("9604", "9671", "9672"), 19: ("5491",), 20: ("4513", "4516", "4443", "9904"),
    21: ("3995", "3895"), 22: ("3995",), 23: ("8622",), 24: ("0017", "3891"),
}

# --- drugs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drug:
    name: str
    drug_type: str
    prod_strength: str
    dose_val_rx: str
    dose_unit_rx: str
    form_val_disp: str
    form_unit_disp: str
    route: str


def _drug(spec: str) -> Drug:
    """'name|type|strength|dose|unit|form value|form unit|route' -> Drug."""
    parts = spec.split("|")
    if len(parts) != 8:
        raise ValueError(f"bad drug spec {spec!r}")
    return Drug(*parts)


# Ward drugs: given to most patients whatever their disease (confounders of any naive
# frequency ranking). Name spellings follow MIMIC-III PRESCRIPTIONS.drug (note the double
# space in the flush). Paired with the per-admission probability of being given.
WARD_DRUGS = (
    (_drug("Sodium Chloride 0.9%  Flush|MAIN|10 mL Syringe|3|mL|0.3|SYR|IV"), 0.80),
    (_drug("Potassium Chloride|MAIN|20mEq Packet|40|mEq|2|PKT|PO"), 0.70),
    (_drug("Heparin|MAIN|5000 Units / mL- 1mL Vial|5000|UNIT|1|mL|SC"), 0.65),
    (_drug("Insulin|MAIN|100 Units / mL - 10 mL Vial|0|UNIT|0|VIAL|SC"), 0.55),
    (_drug("Acetaminophen|MAIN|325mg Tablet|650|mg|2|TAB|PO"), 0.70),
    (_drug("Docusate Sodium|MAIN|100mg Capsule|100|mg|1|CAP|PO"), 0.60),
    (_drug("0.9% Sodium Chloride|BASE|1000mL Bag|1000|mL|1000|mL|IV"), 0.60),
    (_drug("D5W|BASE|250 mL Bag|250|mL|250|mL|IV"), 0.45),
    (_drug("Magnesium Sulfate|MAIN|2 g / 50 mL Premix Bag|2|gm|1|BAG|IV"), 0.50),
    (_drug("Senna|MAIN|1 Tablet|1|TAB|1|TAB|PO"), 0.45),
    (_drug("Bisacodyl|MAIN|5 mg Tab|10|mg|2|TAB|PO"), 0.40),
    (_drug("Ondansetron|MAIN|2 mg/mL - 2 mL Vial|4|mg|2|mL|IV"), 0.35),
)

# Drugs indicated for a phenotype (label order): given often when it is present, with no
# effect on the next visit. Real clinical practice, not efficacy ground truth.
INDICATED_DRUGS = (
    ("Vancomycin|MAIN|1 g Frozen Bag|1000|mg|1|BAG|IV", "Piperacillin-Tazobactam|MAIN|4.5 g Vial|4.5|g|1|VIAL|IV",
     "Cefepime|MAIN|2 g Vial|2|g|1|VIAL|IV"),
    ("Metformin|MAIN|500mg Tablet|500|mg|1|TAB|PO", "Glipizide|MAIN|5mg Tablet|5|mg|1|TAB|PO"),
    ("Insulin Glargine|MAIN|100 Units / mL - 10 mL Vial|20|UNIT|0.2|mL|SC", "Gabapentin|MAIN|300mg Capsule|300|mg|1|CAP|PO"),
    ("Atorvastatin|MAIN|40mg Tablet|40|mg|1|TAB|PO", "Simvastatin|MAIN|20mg Tablet|20|mg|1|TAB|PO"),
    ("Sodium Bicarbonate|MAIN|650mg Tablet|1300|mg|2|TAB|PO", "Potassium Phosphate|MAIN|15mmol Vial|15|mmol|1|VIAL|IV",
     "Calcium Gluconate|MAIN|1g/10mL Vial|1|gm|1|VIAL|IV"),
    ("Lisinopril|MAIN|10mg Tablet|10|mg|1|TAB|PO", "Amlodipine|MAIN|5mg Tablet|5|mg|1|TAB|PO",
     "Hydrochlorothiazide|MAIN|25mg Tablet|25|mg|1|TAB|PO"),
    ("Labetalol|MAIN|100mg Tablet|200|mg|2|TAB|PO", "Hydralazine|MAIN|20mg/mL Vial|10|mg|0.5|mL|IV"),
    ("Aspirin|MAIN|325mg Tablet|325|mg|1|TAB|PO", "Clopidogrel Bisulfate|MAIN|75mg Tablet|75|mg|1|TAB|PO",
     "Nitroglycerin|MAIN|0.4mg SL Tablet|0.4|mg|1|TAB|SL"),
    ("Metoprolol Tartrate|MAIN|25mg Tablet|25|mg|1|TAB|PO", "Isosorbide Mononitrate|MAIN|30mg Tablet|30|mg|1|TAB|PO"),
    ("Atropine Sulfate|MAIN|1mg/10mL Syringe|0.5|mg|5|mL|IV", "Dopamine|MAIN|400mg/250mL Premix|5|mcg/kg/min|1|BAG|IV DRIP"),
    ("Amiodarone HCl|MAIN|200mg Tablet|200|mg|1|TAB|PO", "Diltiazem|MAIN|30mg Tablet|30|mg|1|TAB|PO",
     "Warfarin|MAIN|5mg Tablet|5|mg|1|TAB|PO"),
    ("Furosemide|MAIN|40mg Tablet|40|mg|1|TAB|PO", "Carvedilol|MAIN|6.25mg Tablet|6.25|mg|1|TAB|PO",
     "Spironolactone|MAIN|25mg Tablet|25|mg|1|TAB|PO"),
    ("Nimodipine|MAIN|30mg Capsule|60|mg|2|CAP|PO", "Levetiracetam|MAIN|500mg Tablet|500|mg|1|TAB|PO"),
    ("Ceftriaxone|MAIN|1g Vial|1|gm|1|VIAL|IV", "Azithromycin|MAIN|250mg Tablet|500|mg|2|TAB|PO",
     "Levofloxacin|MAIN|750mg Tablet|750|mg|1|TAB|PO"),
    ("Ipratropium Bromide Neb|MAIN|0.02% 2.5mL Neb|1|NEB|1|NEB|IH", "Albuterol 0.083% Neb Soln|MAIN|2.5mg/3mL Neb|1|NEB|1|NEB|IH",
     "Prednisone|MAIN|20mg Tablet|40|mg|2|TAB|PO"),
    ("Ketorolac|MAIN|30mg/mL Vial|15|mg|0.5|mL|IV", "Lidocaine 5% Patch|MAIN|1 Patch|1|PTCH|1|PTCH|TP"),
    ("Propofol|MAIN|1000mg/100mL Vial|20|mcg/kg/min|1|VIAL|IV DRIP", "Fentanyl Citrate|MAIN|100mcg/2mL Amp|25|mcg|0.5|mL|IV",
     "Midazolam|MAIN|5mg/mL Vial|1|mg|0.2|mL|IV"),
    ("Guaifenesin|MAIN|100mg/5mL Liquid|10|mL|10|mL|PO", "Benzonatate|MAIN|100mg Capsule|100|mg|1|CAP|PO"),
    ("Fluticasone Propionate NASAL|MAIN|50mcg Spray|2|SPRY|2|SPRY|NU", "Sodium Chloride Nasal|MAIN|0.65% Spray|1|SPRY|1|SPRY|NU"),
    ("Lactulose|MAIN|30mL Unit Dose|30|mL|30|mL|PO", "Rifaximin|MAIN|550mg Tablet|550|mg|1|TAB|PO"),
    ("Pantoprazole Sodium|MAIN|40mg Vial|40|mg|1|VIAL|IV", "Octreotide Acetate|MAIN|100mcg/mL Amp|50|mcg|0.5|mL|IV"),
    ("Calcium Acetate|MAIN|667mg Capsule|1334|mg|2|CAP|PO", "Sodium Polystyrene Sulfonate|MAIN|15g/60mL Suspension|30|gm|120|mL|PO"),
    ("Sevelamer|MAIN|800mg Tablet|800|mg|1|TAB|PO", "Epoetin Alfa|MAIN|10000 Units/mL Vial|10000|UNIT|1|mL|SC",
     "Calcitriol|MAIN|0.25mcg Capsule|0.25|mcg|1|CAP|PO"),
    ("Cefazolin|MAIN|1g Vial|1|gm|1|VIAL|IV", "Oxycodone|MAIN|5mg Tablet|5|mg|1|TAB|PO"),
    ("Norepinephrine|MAIN|4mg/250mL Premix|0.05|mcg/kg/min|1|BAG|IV DRIP", "Vasopressin|MAIN|20 Units/mL Vial|2.4|UNIT|1|VIAL|IV DRIP",
     "Phenylephrine|MAIN|10mg/mL Vial|0.5|mcg/kg/min|1|VIAL|IV DRIP"),
)

# Other drugs of hospital care, drawn at random per admission (most common first).
BACKGROUND_DRUGS = tuple(_drug(s) for s in (
    "Morphine Sulfate|MAIN|2mg Syringe|2|mg|1|SYR|IV", "Lorazepam|MAIN|1mg Tablet|1|mg|1|TAB|PO",
    "NS|BASE|500 mL Bag|500|mL|500|mL|IV", "SW|BASE|100mL Bag|100|mL|100|mL|IV",
    "Iso-Osmotic Dextrose|BASE|50mL Bag|50|mL|50|mL|IV", "5% Dextrose|BASE|100mL Bag|100|mL|100|mL|IV",
    "Metoclopramide|MAIN|10mg Tablet|10|mg|1|TAB|PO", "Famotidine|MAIN|20mg Tablet|20|mg|1|TAB|PO",
    "Hydromorphone|MAIN|2mg Tablet|2|mg|1|TAB|PO", "Zolpidem Tartrate|MAIN|5mg Tablet|5|mg|1|TAB|PO",
    "Magnesium Oxide|MAIN|400mg Tablet|400|mg|1|TAB|PO", "Multivitamins|MAIN|1 Tablet|1|TAB|1|TAB|PO",
    "Thiamine|MAIN|100mg Tablet|100|mg|1|TAB|PO", "Folic Acid|MAIN|1mg Tablet|1|mg|1|TAB|PO",
    "Polyethylene Glycol|MAIN|17g Packet|17|g|1|PKT|PO", "Dextrose 50%|MAIN|25g/50mL Syringe|12.5|gm|0.5|SYR|IV",
    "Glucagon|MAIN|1mg Kit|1|mg|1|KIT|IM", "Haloperidol|MAIN|5mg/mL Amp|2|mg|0.4|mL|IV",
    "Quetiapine Fumarate|MAIN|25mg Tablet|25|mg|1|TAB|PO", "Sertraline|MAIN|50mg Tablet|50|mg|1|TAB|PO",
    "Citalopram|MAIN|20mg Tablet|20|mg|1|TAB|PO", "Trazodone|MAIN|50mg Tablet|50|mg|1|TAB|PO",
    "Levothyroxine Sodium|MAIN|50mcg Tablet|50|mcg|1|TAB|PO", "Omeprazole|MAIN|20mg Capsule|20|mg|1|CAP|PO",
    "Simethicone|MAIN|80mg Tablet|80|mg|1|TAB|PO", "Miconazole Powder 2%|MAIN|1 Bottle|1|Appl|0|BTL|TP",
    "Nystatin Oral Suspension|MAIN|100000 Units/mL|5|mL|5|mL|PO", "Artificial Tears|MAIN|15mL Bottle|1-2|DROP|0|BTL|BOTH EYES",
    "Sarna Lotion|MAIN|222mL Bottle|1|Appl|0|BTL|TP", "Bacitracin Ointment|MAIN|30g Tube|1|Appl|0|TUBE|TP",
    "Lidocaine Jelly 2%|MAIN|30mL Tube|1|Appl|0|TUBE|TP", "Chlorhexidine Gluconate 0.12% Oral Rinse|MAIN|15mL Cup|15|mL|15|mL|ORAL",
    "Tamsulosin|MAIN|0.4mg Capsule|0.4|mg|1|CAP|PO", "Finasteride|MAIN|5mg Tablet|5|mg|1|TAB|PO",
    "Allopurinol|MAIN|100mg Tablet|100|mg|1|TAB|PO", "Prochlorperazine|MAIN|10mg Tablet|10|mg|1|TAB|PO",
    "Diphenhydramine|MAIN|25mg Capsule|25|mg|1|CAP|PO", "Loratadine|MAIN|10mg Tablet|10|mg|1|TAB|PO",
    "Ferrous Sulfate|MAIN|325mg Tablet|325|mg|1|TAB|PO", "Cyanocobalamin|MAIN|1000mcg/mL Vial|1000|mcg|1|mL|IM",
    "Vitamin D|MAIN|400 Units Tablet|800|UNIT|2|TAB|PO", "Calcium Carbonate|MAIN|500mg Tablet|500|mg|1|TAB|PO",
    "Alprazolam|MAIN|0.25mg Tablet|0.25|mg|1|TAB|PO", "Clonazepam|MAIN|0.5mg Tablet|0.5|mg|1|TAB|PO",
    "Meropenem|MAIN|500mg Vial|1000|mg|2|VIAL|IV", "Metronidazole|MAIN|500mg Tablet|500|mg|1|TAB|PO",
    "Ciprofloxacin HCl|MAIN|500mg Tablet|500|mg|1|TAB|PO", "Fluconazole|MAIN|200mg Tablet|200|mg|1|TAB|PO",
    "Acyclovir|MAIN|400mg Tablet|400|mg|1|TAB|PO", "Sulfameth/Trimethoprim DS|MAIN|800/160mg Tab|1|TAB|1|TAB|PO",
    "Enoxaparin Sodium|MAIN|40mg/0.4mL Syringe|40|mg|0.4|mL|SC", "Dexamethasone|MAIN|4mg Tablet|4|mg|1|TAB|PO",
    "Hydrocortisone Na Succ.|MAIN|100mg Vial|50|mg|0.5|VIAL|IV", "Methylprednisolone Sodium Succ|MAIN|125mg Vial|60|mg|0.5|VIAL|IV",
    "Lactated Ringers|BASE|1000mL Bag|1000|mL|1000|mL|IV", "Phytonadione|MAIN|5mg Tablet|5|mg|1|TAB|PO",
    "Sucralfate|MAIN|1g Tablet|1|gm|1|TAB|PO", "Ranitidine|MAIN|150mg Tablet|150|mg|1|TAB|PO",
    "Nicotine Patch|MAIN|14mg/24hr Patch|1|PTCH|1|PTCH|TD", "Bupropion|MAIN|75mg Tablet|75|mg|1|TAB|PO",
))

# Syllables of the invented planted drug names: a fixed seed, independent of the cohort
# seed, so the ground truth names are the same for every cohort.
_PLANTED_NAME_SEED = 2506_15118
_SYLLABLE_HEADS = ("Ze", "Vo", "Ka", "Mi", "Ro", "Tu", "Lo", "Se", "Da", "Ni", "Pe", "Qua", "Xa", "Bre", "Cly", "Fen",
                   "Gor", "Hal", "Jo", "Ly", "Mor", "Nor", "Pra", "Sol", "Tri", "Ul", "Ver", "Wy", "Yo", "Zan")
_SYLLABLE_MIDDLES = ("ra", "lu", "ven", "tix", "mo", "dra", "sel", "quo", "rin", "pha", "ga", "lor", "bi", "ne", "stra")
_SYLLABLE_TAILS = ("vastin", "pril", "dronib", "tazone", "mectin", "lukast", "cillane", "floxil", "paride", "semtal",
                   "gliptor", "zumab", "tidine", "xaban", "rolimus", "sartine", "fungin", "cortide", "parinol", "setron")
_PLANTED_FORMS = ("Tablet|PO", "Capsule|PO", "Vial|IV", "Syringe|SC")


DECOYS_PER_PHENOTYPE = 2
"""No-effect drugs per phenotype that `synth.confounding` gives preferentially in flares."""
_MAX_PLANTED = 10  # the most drugs_per_phenotype allows


def _invented_names() -> list[str]:
    """All invented drug names, in a fixed order: planted slots first, then decoy slots."""
    rng = np.random.default_rng(_PLANTED_NAME_SEED)
    taken = {d.name.lower() for d in all_real_drugs()}
    names: list[str] = []
    while len(names) < NUM_PHENOTYPES * (_MAX_PLANTED + DECOYS_PER_PHENOTYPE):
        name = (_SYLLABLE_HEADS[rng.integers(len(_SYLLABLE_HEADS))]
                + _SYLLABLE_MIDDLES[rng.integers(len(_SYLLABLE_MIDDLES))]
                + _SYLLABLE_TAILS[rng.integers(len(_SYLLABLE_TAILS))])
        if name.lower() not in taken:
            taken.add(name.lower())
            names.append(name)
    return names


def planted_drug_names(per_phenotype: int) -> list[list[str]]:
    """`per_phenotype` invented drug names for each of the 25 phenotypes, all distinct.

    Deterministic: the k-th name of a phenotype does not depend on `per_phenotype`."""
    names = _invented_names()
    return [[names[k * NUM_PHENOTYPES + p] for k in range(per_phenotype)] for p in range(NUM_PHENOTYPES)]


def decoy_drug_names() -> list[list[str]]:
    """DECOYS_PER_PHENOTYPE invented names per phenotype, after every planted slot (so a decoy
    never shares a name with a planted drug, whatever drugs_per_phenotype is)."""
    names = _invented_names()
    base = NUM_PHENOTYPES * _MAX_PLANTED
    return [[names[base + k * NUM_PHENOTYPES + p] for k in range(DECOYS_PER_PHENOTYPE)]
            for p in range(NUM_PHENOTYPES)]


# Non-phenotype diagnosis codes that show a patient's propensity for a disease cluster (risk
# factors and markers of chronic disease): what a visit shows of the latent propensity.
CLUSTER_MARKERS = {
    "metabolic": ("27800", "V5867", "4439", "32723"),
    "cardiac": ("V5861", "4241", "4240", "V5866"),
    "sepsis": ("70703", "04112", "2639", "28800"),
    "pulmonary": ("V1582", "3051", "1629", "V5865"),
    "gi": ("30500", "53081", "56210", "2800"),
    "surgical": ("V4364", "V4365", "71590", "E8788"),
    "neuro": ("3310", "29410", "34590", "V1588"),
}


def planted_drug(name: str) -> Drug:
    """Catalogue entry of an invented drug: strength and form from a stable hash of the name."""
    h = zlib.crc32(name.encode())
    form, route = _PLANTED_FORMS[h % len(_PLANTED_FORMS)].split("|")
    dose = (5, 10, 20, 25, 50, 100)[(h >> 4) % 6]
    unit = "mg"
    return Drug(name, "MAIN", f"{dose}{unit} {form}", str(dose), unit, "1", form.upper()[:4], route)


def all_real_drugs() -> list[Drug]:
    return ([d for d, _ in WARD_DRUGS] + [_drug(s) for group in INDICATED_DRUGS for s in group]
            + list(BACKGROUND_DRUGS))


def indicated_drugs() -> list[list[Drug]]:
    return [[_drug(s) for s in group] for group in INDICATED_DRUGS]


def drug_codes(name: str) -> tuple[str, str, str]:
    """(formulary_drug_cd, gsn, ndc) of a drug: stable across runs (crc32, not hash())."""
    h = zlib.crc32(name.encode())
    letters = "".join(c for c in name.upper() if c.isalpha())[:4] or "DRUG"
    return f"{letters}{h % 1000}", f"{h % 1_000_000:06d}", f"{(h * 2654435761) % 100_000_000_000:011d}"


# --- dictionaries -------------------------------------------------------------------------


@dataclass(frozen=True)
class DiagnosisVocabulary:
    codes: list[str]
    """All diagnosis codes the generator may write, index = code id."""
    short_titles: list[str]
    long_titles: list[str]
    phenotype_code_ids: list[np.ndarray]
    """Per phenotype: code ids of its codes, common codes first."""
    phenotype_code_weights: list[np.ndarray]
    """Per phenotype: probability of each of its codes (sums to 1)."""
    other_code_ids: np.ndarray
    other_code_weights: np.ndarray


def _zipf(n: int, exponent: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** exponent
    return w / w.sum()


def diagnosis_vocabulary(code_zipf: float) -> DiagnosisVocabulary:
    """The diagnosis dictionary: every phenotype code (titles generated from the phenotype's
    display name unless a real title is known) plus the non-phenotype codes of OTHER_DX."""
    codes: list[str] = []
    shorts: list[str] = []
    longs: list[str] = []
    pheno_ids: list[np.ndarray] = []
    pheno_weights: list[np.ndarray] = []
    for p in phenotypes():
        known = [c for c in KNOWN_DX_TITLES if c in p.codes]
        ordered = known + [c for c in p.codes if c not in known]
        ids = []
        for k, code in enumerate(ordered):
            if code in KNOWN_DX_TITLES:
                short, long = KNOWN_DX_TITLES[code]
            else:
                short, long = _generated_title(PHENOTYPE_DISPLAY[p.index], k, p.kind)
            ids.append(len(codes))
            codes.append(code)
            shorts.append(short)
            longs.append(long)
        pheno_ids.append(np.asarray(ids, dtype=np.int32))
        pheno_weights.append(_zipf(len(ids), code_zipf))
    table = code_to_phenotype_table()
    other_ids = []
    for code, short, long in OTHER_DX:
        if code in table or code in codes:
            continue  # belongs to a phenotype: would change the labels
        other_ids.append(len(codes))
        codes.append(code)
        shorts.append(short)
        longs.append(long)
    return DiagnosisVocabulary(codes, shorts, longs, pheno_ids, pheno_weights,
                               np.asarray(other_ids, dtype=np.int32), _zipf(len(other_ids), code_zipf))


def _generated_title(display: str, k: int, kind: str) -> tuple[str, str]:
    """Title of the k-th code of a phenotype: display name plus one or two qualifiers
    (never 'acute' on a chronic disease or 'chronic' on an acute one)."""
    wrong = "acute" if kind == "chronic" else "chronic"
    qualifiers = [q for q in _QUALIFIERS if q[0] != wrong]
    n = len(qualifiers)
    first_long, first_short = qualifiers[k % n]
    long = f"{display}, {first_long}"
    short = f"{_abbreviate(display)} {first_short}"
    if k >= n:
        second_long, second_short = qualifiers[(k // n - 1) % n]
        long += f", {second_long}"
        short += f" {second_short}"
    return short[:24], long


def _abbreviate(text: str) -> str:
    """MIMIC-style short title stem: first word plus initials of the others."""
    words = text.split()
    return words[0][:10] + ("".join(" " + w[:3] for w in words[1:3]) if len(words) > 1 else "")
