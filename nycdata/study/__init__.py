"""Study layer: experiments and their results (training, evaluation, statistics, reports, supplement, bench, the
notebook chain). Imports every layer below it."""
