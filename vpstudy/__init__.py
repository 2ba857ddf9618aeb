"""vpstudy: step-dependent visual evidence in vision-language models."""
