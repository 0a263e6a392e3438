# medmax-pipeline: rebuild, extend and retrain MedMax as one reproducible workflow.
#   snakemake --cores 2                                  # the embedded demo (config.yaml)
#   snakemake --workflow-profile workflow/profiles/slurm-cpu  # the same on a SLURM cluster (slurm-gpu: GPUs; README)
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/collect.smk"
include: "workflow/rules/tokenize.smk"
include: "workflow/rules/vocab.smk"
include: "workflow/rules/assemble.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/slurm.smk"


# Cheap rules run in the Snakemake process itself, also under a cluster executor: as SLURM jobs
# each would cost a Snakefile parse plus status polling (tens of seconds) for a second of work.
localrules:
    gather_tokens,
    map_vocab,
    score,
    report_figures,


report: "workflow/report/workflow.rst"


rule all:
    input:
        final_targets(),
    default_target: True
