"""Commands over published artifacts, not stages: `calibrate` (choose tau and K from the
annotations), `report` (one HTML page per dataset) and `audit` (the training material's
invariants). Their typer entry points are in :mod:`stages.tools.commands`, which the stages
package exposes to the CLI as `COMMANDS`."""
