"""hil: simulated sites (SunSpec Modbus devices with numpy physics) and the HIL scenario runner.

Imports nothing from gateway/ or drivers/: a simulator sharing code with the thing under test
would hide symmetric bugs.
"""
