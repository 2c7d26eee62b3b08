"""Interpretability probes over a Policy: attribution, saliency, attention analysis and more.

Re-exports are explicit (``name as name``); add one line per public name.
"""

from probes.attribution import Attribution as Attribution
from probes.attribution import IntegratedGradients as IntegratedGradients
from probes.attribution import benchmark_ig_vs_captum as benchmark_ig_vs_captum
