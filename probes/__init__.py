"""Interpretability probes over a Policy: attribution, saliency, attention analysis and more.

Re-exports are explicit (``name as name``); add one line per public name.
"""

from probes.attention_maps import attention_entropy as attention_entropy
from probes.attention_maps import attention_overlay as attention_overlay
from probes.attention_maps import peak_tree as peak_tree
from probes.attribution import Attribution as Attribution
from probes.attribution import IntegratedGradients as IntegratedGradients
from probes.attribution import benchmark_ig_vs_captum as benchmark_ig_vs_captum
from probes.saliency import attention_gradient as attention_gradient
from probes.saliency import gradient_saliency as gradient_saliency
from probes.saliency import newest_frame as newest_frame
from probes.saliency import perturbation_saliency as perturbation_saliency
from probes.saliency import smoothgrad as smoothgrad
from probes.saliency import vargrad as vargrad
