"""Names the stages agree on: the protected attributes and clinical labels of the formats.

Kept apart from the adapters so that models and evaluation can read the label vocabulary
without importing a dataset reader.
"""

from __future__ import annotations

#: Allowed values of the clinical labels (data_summary.csv) and their decoded forms.
CLINICAL_LABELS: dict[str, list[str]] = {
    "glaucoma": ["non-glaucoma", "glaucoma"],
    "md_severity": ["normal", "mild", "moderate", "severe"],
    "cdr_status": ["normal", "borderline", "abnormal"],
    "se_status": ["positive", "neutral", "negative"],
}
