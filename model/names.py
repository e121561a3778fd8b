"""Names shared by the CLI and the model code, importable without torch."""

ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnext50", "densenet121")
