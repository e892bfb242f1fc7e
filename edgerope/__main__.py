from edgerope.cli import main

main()
