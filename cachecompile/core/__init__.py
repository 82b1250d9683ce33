"""The bottom layer: schedule data, plans and actions, regions as data, the step-program
contract between compiler and runtime, and the errors. It imports nothing else of ours."""
