from adapter_fusion.cli import main

main()
